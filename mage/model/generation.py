"""Evaluation-time generation for SeedXModel: greedy text and teacher-forced image features.

Batches come left-padded (attention_mask 0 on the left), so every prompt ends at the last column
and new tokens are appended there; position ids count real tokens only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

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
    eos = tokenizer.eos_token_id
    texts = []
    for row in greedy_tokens(model, batch, max_new_tokens, eos, tokenizer.pad_token_id).tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def greedy_tokens(model: "SeedXModel", batch: dict, max_new_tokens: int, eos: int, pad: int) -> torch.Tensor:
    """(B, n <= max_new_tokens) greedy tokens with a KV cache; after a row's EOS it gets `pad`."""
    attention_mask = batch["attention_mask"].long()
    _require_left_padding(attention_mask)
    embeds, _ = model.embed_inputs(batch)
    positions = position_ids_from_mask(attention_mask)
    out = model.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                    use_cache=True, logits_to_keep=1)
    cache, next_position = out.past_key_values, positions[:, -1:] + 1
    batch_size = attention_mask.shape[0]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=attention_mask.device)
    generated = []
    for step in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(dim=-1)
        next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
        generated.append(next_token)
        finished |= next_token == eos
        # One host sync per generated token, to stop as soon as every row has ended.
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)
        out = model.llm(input_ids=next_token.unsqueeze(1), attention_mask=attention_mask, position_ids=next_position,
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, next_position = out.past_key_values, next_position + 1
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
