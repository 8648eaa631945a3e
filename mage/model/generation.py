"""Evaluation-time generation for SeedXModel: greedy text, teacher-forced image features, and free-running
generation through transformers `generate` (SEED-X's evaluation).

Batches come left-padded (attention_mask 0 on the left), so every prompt ends at the last column
and new tokens are appended there; position ids count real tokens only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .positions import position_ids_from_mask

if TYPE_CHECKING:
    from .seedx import SeedXModel


def _require_tokenizer(model: "SeedXModel"):
    if model.tokenizer is None:
        raise ValueError("generation needs a tokenizer: build the model with tokenizer=... or set model.tokenizer")
    return model.tokenizer


def _require_left_padding(attention_mask: torch.Tensor) -> None:
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generation expects left-padded prompts (attention_mask[:, -1] all 1); "
                         "collate evaluation batches with left padding")


def token_id(tokenizer, token: str) -> int:
    """The id of a special token, with a clear error when the tokenizer lacks it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or (ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer has no token {token!r}; use the SEED-X tokenizer (mage.data.tokenizer)")
    return ids[0]


def generate_text(model: "SeedXModel", batch: dict, max_new_tokens: int = 32) -> list[str]:
    tokenizer = _require_tokenizer(model)
    return tokens_to_texts(tokenizer, greedy_tokens(model, batch, max_new_tokens, tokenizer.eos_token_id,
                                                    tokenizer.pad_token_id))


def tokens_to_texts(tokenizer, tokens: torch.Tensor) -> list[str]:
    """Generated token rows cut at their first EOS and decoded without special tokens."""
    eos, texts = tokenizer.eos_token_id, []
    for row in tokens.tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def greedy_tokens(model: "SeedXModel", batch: dict, max_new_tokens: int, eos: int, pad: int,
                  weights: Sequence[Callable[[], AbstractContextManager]] = (nullcontext,),
                  pick: Callable[[list[torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
    """(B, n <= max_new_tokens) greedy tokens with a KV cache; after a row's EOS it gets `pad`.

    `weights`: one context per variant of the model's weights (e.g. LAE's online and offline copies), each
    decoded with its own KV cache on the same tokens; `pick` turns their last-position logits into the next
    token (default: the argmax of the single variant's logits).
    """
    attention_mask = batch["attention_mask"].long()
    _require_left_padding(attention_mask)
    positions = position_ids_from_mask(attention_mask)
    outs = []
    for variant in weights:
        with variant():
            embeds, _ = model.embed_inputs(batch)
            outs.append(model.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                  use_cache=True, logits_to_keep=1))
    caches, next_position = [o.past_key_values for o in outs], positions[:, -1:] + 1
    batch_size = attention_mask.shape[0]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=attention_mask.device)
    generated = []
    for step in range(max_new_tokens):
        logits = [o.logits[:, -1] for o in outs]
        next_token = logits[0].argmax(dim=-1) if pick is None else pick(logits)
        next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
        generated.append(next_token)
        finished |= next_token == eos
        # One host sync per generated token, to stop as soon as every row has ended.
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        for i, variant in enumerate(weights):
            with variant():
                outs[i] = model.llm(input_ids=next_token.unsqueeze(1), attention_mask=attention_mask,
                                    position_ids=next_position, past_key_values=caches[i], use_cache=True,
                                    logits_to_keep=1)
            caches[i] = outs[i].past_key_values
        next_position = next_position + 1
    if not generated:
        return attention_mask.new_zeros(batch_size, 0)
    return torch.stack(generated, dim=1)


@torch.no_grad()
def generate_image_features(model: "SeedXModel", batch: dict) -> torch.Tensor:
    """Append <img> (unless every prompt already ends with it) and the Q <img_i> tokens, as SEED-X
    does at inference, and resample the final hidden states at those Q positions -> (B, Q, D)."""
    tokenizer = _require_tokenizer(model)
    config = model.config
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"].long()
    _require_left_padding(attention_mask)
    boi = token_id(tokenizer, config.boi_token)
    image_tokens = [token_id(tokenizer, config.image_token_format.format(i)) for i in range(model.num_image_tokens)]
    ends_with_boi = input_ids[:, -1] == boi
    if bool(ends_with_boi.all()):
        suffix = image_tokens
    elif not bool(ends_with_boi.any()):
        suffix = [boi] + image_tokens
    else:
        raise ValueError(f"some prompts end with {config.boi_token} and some do not; make them agree")
    batch_size = input_ids.shape[0]
    suffix_ids = torch.tensor(suffix, device=input_ids.device).expand(batch_size, -1)
    prompt_embeds, _ = model.embed_inputs(batch)
    embeds = torch.cat([prompt_embeds, model.llm.get_input_embeddings()(suffix_ids)], dim=1)
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, len(suffix))], dim=1)
    out = model.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask),
                    output_hidden_states=True, use_cache=False, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, -model.num_image_tokens:]
    return model.output_resampler(hidden)


# ----- free-running generation (SEED-X's evaluation: the model must emit <img> itself) ---------------

class ImageTokenProcessor(LogitsProcessor):
    """SEED-X's image-token rule for `generate`: after `<img>` (or an `<img_i>`) the next image token is
    forced, then `</img>`; anywhere else the image tokens and `</img>` cannot be chosen, so an image
    only appears if the model itself emits `<img>`. (SEED-X sets those logits to 0.0 instead of -inf,
    which lets a token with negative logits everywhere else start an image without `<img>`; we block
    them outright.)"""

    def __init__(self, boi: int, image_ids: list[int], eoi: int):
        chain = [boi, *image_ids, eoi]
        self.chain = torch.tensor(chain)
        self.blocked = torch.tensor(chain[1:])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chain = self.chain.to(input_ids.device)
        if input_ids.shape[1] == 0:
            return scores.index_fill(1, self.blocked.to(scores.device), float("-inf"))
        last = input_ids[:, -1]
        position = (last.unsqueeze(1) == chain[:-1].unsqueeze(0)).float().argmax(dim=1)
        in_image = (last.unsqueeze(1) == chain[:-1].unsqueeze(0)).any(dim=1)
        out = scores.clone()
        out[:, self.blocked.to(scores.device)] = float("-inf")
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, chain[position + 1].unsqueeze(1), 0.0)
        return torch.where(in_image.unsqueeze(1), forced, out)


@dataclass
class FreeGeneration:
    texts: list[str]                           # generated text without the image tokens
    image_features: list[torch.Tensor | None]  # (Q, D) output-resampler features of the first image, or None
    token_ids: list[list[int]]                 # every generated id (for inspection)


@torch.no_grad()
def generate_free(model: "SeedXModel", batch: dict, max_new_tokens: int) -> FreeGeneration:
    """Greedy `generate` from the prompt embeddings (input images scattered in) with ImageTokenProcessor.

    A row that emits `<img>` gets its Q image tokens forced; the final hidden states (after the last
    RMSNorm, as in training) at those Q tokens go through the output resampler. A row that never
    emits `<img>` produces no image (its features are None, scored 0).
    """
    tokenizer = _require_tokenizer(model)
    config = model.config
    attention_mask = batch["attention_mask"].long()
    _require_left_padding(attention_mask)
    q = model.num_image_tokens
    boi, eoi = token_id(tokenizer, config.boi_token), token_id(tokenizer, config.eoi_token)
    image_ids = [token_id(tokenizer, config.image_token_format.format(i)) for i in range(q)]
    embeds, _ = model.embed_inputs(batch)
    hidden: list[torch.Tensor] = []  # final-norm outputs: the prompt first, then one column per step
    hook = model.llm.model.norm.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    try:
        out = model.llm.generate(
            input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=1, logits_processor=LogitsProcessorList([ImageTokenProcessor(boi, image_ids, eoi)]),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)
    finally:
        hook.remove()
    prompt_length = batch["input_ids"].shape[1]
    sequences = out.sequences[:, prompt_length:] if out.sequences.shape[1] > prompt_length else out.sequences[:, :0]
    # Column k of `states` is the state at generated token k when it was the input (step k + 1).
    states = torch.cat(hidden[1:], dim=1) if len(hidden) > 1 else embeds.new_zeros(embeds.shape[0], 0, embeds.shape[-1])
    texts, features, ids = [], [], []
    image_set = set(image_ids) | {boi, eoi}
    for row, seq in enumerate(sequences.tolist()):
        if tokenizer.eos_token_id in seq:
            seq = seq[: seq.index(tokenizer.eos_token_id)]
        ids.append(seq)
        feature = None
        if eoi in seq:
            end = seq.index(eoi)
            if end >= q and seq[end - q:end] == image_ids and end <= states.shape[1]:
                feature = model.output_resampler(states[row:row + 1, end - q:end].to(model.output_resampler.query.dtype))[0]
        features.append(feature)
        texts.append(tokenizer.decode([t for t in seq if t not in image_set], skip_special_tokens=True).strip())
    return FreeGeneration(texts, features, ids)
