"""LAE's inference: two models (online and offline weights) decoded together.

Text: greedy decoding where each step's token is argmax_v max(p_online(v), p_offline(v)), the element-wise
max of the two next-token distributions; each model keeps its own KV cache and sees the same (ensemble)
tokens. Images: the generated output-image features are the mean of the two models' features. An image
output here is a regression (the output resampler's features, teacher-forced <img_i> tokens), not a
distribution, so there is no max of probabilities to take; the mean is the regression analogue of
ensembling the two experts.

The offline weights are swapped in by pointer (``param.data``) around each offline forward: no copy of
the weights per step. The model is SeedXModel-shaped (``embed_inputs``, ``llm``, ``output_resampler``,
``tokenizer``, ``num_image_tokens``).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from mage.model.positions import position_ids_from_mask


@contextmanager
def swapped_weights(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily make ``params`` hold ``values`` (same shapes and dtypes; no copies). Inference only."""
    saved = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v
        yield
    finally:
        for p, s in zip(params, saved):
            p.data = s


class MaxOfTwoDecoder:
    """``generate_text`` / ``generate_image_features`` of the online model combined with an offline copy."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], offline: Sequence[torch.Tensor]):
        self.model = model
        self.params = list(params)
        # Cast once per evaluation (a no-op for float32 weights): the swap then needs no copies.
        self.offline = [v.to(p.dtype) for p, v in zip(self.params, offline)]

    def _offline(self):
        return swapped_weights(self.params, self.offline)

    @torch.no_grad()
    def greedy_tokens(self, batch: dict, max_new_tokens: int, eos: int, pad: int) -> torch.Tensor:
        """(B, n <= max_new_tokens); after a row's EOS it gets ``pad``."""
        model = self.model
        attention_mask = batch["attention_mask"].long()
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generation expects left-padded prompts (attention_mask[:, -1] all 1)")
        positions = position_ids_from_mask(attention_mask)
        sides = (nullcontext, self._offline)
        outs = []
        for side in sides:
            with side():
                embeds, _ = model.embed_inputs(batch)
                outs.append(model.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                      use_cache=True, logits_to_keep=1))
        caches = [o.past_key_values for o in outs]
        next_position = positions[:, -1:] + 1
        batch_size = attention_mask.shape[0]
        finished = torch.zeros(batch_size, dtype=torch.bool, device=attention_mask.device)
        generated = []
        for step in range(max_new_tokens):
            probs = torch.maximum(*(torch.softmax(o.logits[:, -1].float(), dim=-1) for o in outs))
            next_token = probs.argmax(dim=-1)
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            generated.append(next_token)
            finished |= next_token == eos
            # One host sync per generated token, to stop as soon as every row has ended.
            if step + 1 == max_new_tokens or bool(finished.all()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
            for i, side in enumerate(sides):
                with side():
                    outs[i] = model.llm(input_ids=next_token.unsqueeze(1), attention_mask=attention_mask,
                                        position_ids=next_position, past_key_values=caches[i], use_cache=True,
                                        logits_to_keep=1)
                caches[i] = outs[i].past_key_values
            next_position = next_position + 1
        if not generated:
            return attention_mask.new_zeros(batch_size, 0)
        return torch.stack(generated, dim=1)

    def generate_text(self, batch: dict, max_new_tokens: int = 32) -> list[str]:
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise ValueError("generation needs a tokenizer: build the model with tokenizer=...")
        eos = tokenizer.eos_token_id
        texts = []
        for row in self.greedy_tokens(batch, max_new_tokens, eos, tokenizer.pad_token_id).tolist():
            row = row[: row.index(eos)] if eos in row else row
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    @torch.no_grad()
    def generate_image_features(self, batch: dict) -> torch.Tensor:
        online = self.model.generate_image_features(batch)
        with self._offline():
            offline = self.model.generate_image_features(batch)
        return (online.float() + offline.float()).div(2).to(online.dtype)
