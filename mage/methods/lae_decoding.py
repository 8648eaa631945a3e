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

from mage.model.generation import greedy_tokens, tokens_to_texts


def _max_of_distributions(logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.maximum(*(torch.softmax(x.float(), dim=-1) for x in logits)).argmax(dim=-1)


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

    def greedy_tokens(self, batch: dict, max_new_tokens: int, eos: int, pad: int) -> torch.Tensor:
        """(B, n <= max_new_tokens): at each step the argmax of the element-wise max of both distributions;
        after a row's EOS it gets ``pad``."""
        return greedy_tokens(self.model, batch, max_new_tokens, eos, pad, weights=(nullcontext, self._offline),
                             pick=_max_of_distributions)

    def generate_text(self, batch: dict, max_new_tokens: int = 32) -> list[str]:
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise ValueError("generation needs a tokenizer: build the model with tokenizer=...")
        return tokens_to_texts(tokenizer, self.greedy_tokens(batch, max_new_tokens, tokenizer.eos_token_id,
                                                             tokenizer.pad_token_id))

    @torch.no_grad()
    def generate_image_features(self, batch: dict) -> torch.Tensor:
        online = self.model.generate_image_features(batch)
        with self._offline():
            offline = self.model.generate_image_features(batch)
        return (online.float() + offline.float()).div(2).to(online.dtype)
