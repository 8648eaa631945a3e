"""Batches for the model (docs/DESIGN.md "Model"): tokens, labels, image views and the image masks.

One example's token sequence (SEED-X, docs/METHOD.md section 7):

    <s> [INST] {image tokens}{instruction 1} [/INST]\\n {answer 1} \\n[INST] {instruction 2} [/INST]\\n {answer 2} </s>

- The input image's tokens go at the START of the first turn (SEED-X picks start or end at random; we
  fix the start so batches are deterministic). Each view is Q placeholder tokens `<img_00000>`..
  `<img_{Q-1}>` (whose embeddings the model replaces with resampler outputs) wrapped in `<patch>`..
  `</patch>` for tiles and `<img>`..`</img>` for the global view (last). `input_image_mask` marks the
  V * Q placeholders.
- User turns (with the "\\n" turn separator) and BOS are -100; text answers and the final EOS are
  supervised.
- An image answer is [reply] `<img>` + Q `<img_i>` + `</img>`: the optional polite reply (SEED-X's, when
  enabled), `<img>` and EOS are supervised, the Q tokens and `</img>` are -100 and `output_image_mask`
  marks the Q tokens.

mode="train": right padding (pad id, attention 0, label -100). mode="generate": the prompt only (every
turn but the last answer), LEFT padding, labels all -100; for an image answer the prompt ends with
`<img>` (force_image=True, the mini default; with False it ends at "[/INST]\n" and the model must emit
`<img>` itself) and the model appends the Q `<img_i>` tokens itself, so `output_image_mask` is all False while
`target_images` still holds the targets (for scoring) of the image-answer examples that have one (a
release test record of Flickr30k has only its caption).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mage.data.images import ImageConfig
from mage.data.tokenizer import IMAGE_TOKENS, IMG_END, IMG_START, PATCH_END, PATCH_START
from mage.data.vocab import PROMPT_TEMPLATE

IGNORE = -100
TURN_SEP = "\n"


@dataclass
class Example:
    """One example ready to collate (built by `mage.data.dataset.TaskDataset`)."""
    task_id: int
    example_id: str
    turns: list[tuple[str, str]]          # (instruction, answer); the last answer is ignored if output_image
    output_image: bool = False            # the (last) answer is an image
    views: torch.Tensor | None = None     # (V, 3, H, W) input image views, tiles first, global last
    positions: torch.Tensor | None = None  # (V, 2) normalised tile centres
    target: torch.Tensor | None = None    # (3, H, W) target image when output_image
    reply: str = ""                       # supervised text before an image answer's <img> (SEED-X's polite reply)


def image_token_text(num_views: int, q: int) -> str:
    """The placeholder text of one input image with num_views views (tiles as <patch>, global as <img>)."""
    if not 1 <= q <= len(IMAGE_TOKENS):
        raise ValueError(f"num_query_tokens={q}: the tokenizer defines {len(IMAGE_TOKENS)} image tokens")
    body = "".join(IMAGE_TOKENS[:q])
    return (PATCH_START + body + PATCH_END) * (num_views - 1) + IMG_START + body + IMG_END


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _example_tokens(ex: Example, tokenizer, cfg: ImageConfig, generate: bool,
                    force_image: bool = True) -> tuple[list[int], list[int], list[bool], list[bool]]:
    """ids, labels, input-image mask, output-image mask of one example (unpadded)."""
    q = cfg.num_query_tokens
    placeholders = tokenizer.convert_tokens_to_ids(list(IMAGE_TOKENS[:q]))
    placeholder_set = set(placeholders)
    img_start, img_end = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END])
    ids: list[int] = []
    labels: list[int] = []
    in_mask: list[bool] = []
    out_mask: list[bool] = []

    def push(tokens: list[int], supervised: list[bool], inp: list[bool] | None = None, out: list[bool] | None = None) -> None:
        ids.extend(tokens)
        labels.extend(t if s else IGNORE for t, s in zip(tokens, supervised))
        in_mask.extend(inp or [False] * len(tokens))
        out_mask.extend(out or [False] * len(tokens))

    if not ex.turns:
        raise ValueError(f"example {ex.example_id}: no turns")
    if ex.output_image and ex.target is None and not generate:
        raise ValueError(f"example {ex.example_id}: an image answer needs a target image")
    num_views = 0 if ex.views is None else ex.views.shape[0]
    push([tokenizer.bos_token_id], [False])
    for k, (instruction, answer) in enumerate(ex.turns):
        last = k == len(ex.turns) - 1
        image_text = image_token_text(num_views, q) if (k == 0 and num_views) else ""
        user = (TURN_SEP if k else "") + PROMPT_TEMPLATE.format(instruction=image_text + instruction)
        user_ids = _encode(tokenizer, user)
        is_placeholder = [i in placeholder_set for i in user_ids]
        expected = num_views * q if k == 0 else 0
        if sum(is_placeholder) != expected:
            raise ValueError(f"example {ex.example_id}: turn {k} holds {sum(is_placeholder)} image placeholder "
                             f"tokens, expected {expected}; instructions must not contain image tokens")
        push(user_ids, [False] * len(user_ids), inp=is_placeholder)
        if last and ex.output_image:
            if generate:
                if force_image:  # the prompt ends with <img>; the model teacher-forces the Q tokens
                    push([img_start], [False])
            else:  # supervise the reply and <img>; the Q tokens feed the output resampler
                reply = _encode(tokenizer, ex.reply) if ex.reply else []
                push(reply, [True] * len(reply))
                push([img_start] + placeholders + [img_end], [True] + [False] * (q + 1),
                     out=[False] + [True] * q + [False])
        elif not (last and generate):
            ans = _encode(tokenizer, answer)
            push(ans, [True] * len(ans))
    if not generate:
        push([tokenizer.eos_token_id], [True])
    return ids, labels, in_mask, out_mask


def collate(examples: list[Example], tokenizer, image_cfg: ImageConfig, mode: str = "train",
            max_length: int | None = None, force_image: bool = True) -> dict:
    """The model's batch dict (docs/DESIGN.md) from examples; mode "train" (right pad) or "generate" (left pad).

    In "generate" mode an image-answer prompt ends with `<img>` when `force_image` (the teacher-forced
    image of the mini benchmark); without it the prompt ends at "[/INST]\n" and the model must emit
    `<img>` itself (free-running generation, as SEED-X evaluates).
    """
    if mode not in ("train", "generate"):
        raise ValueError(f"collate mode {mode!r}: use 'train' or 'generate'")
    if not examples:
        raise ValueError("collate got an empty list of examples")
    generate = mode == "generate"
    rows = [_example_tokens(ex, tokenizer, image_cfg, generate, force_image) for ex in examples]
    T = max(len(r[0]) for r in rows)
    if max_length is not None and T > max_length:
        worst = max(range(len(rows)), key=lambda i: len(rows[i][0]))
        raise ValueError(f"example {examples[worst].example_id} has {T} tokens > max_length={max_length}; "
                         f"raise max_length or shorten the record")
    B = len(examples)
    input_ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    input_image_mask = torch.zeros((B, T), dtype=torch.bool)
    output_image_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (ids, lab, im, om) in enumerate(rows):
        n = len(ids)
        sl = slice(T - n, T) if generate else slice(0, n)
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
        labels[b, sl] = torch.tensor(lab)
        input_image_mask[b, sl] = torch.tensor(im)
        output_image_mask[b, sl] = torch.tensor(om)
    s = image_cfg.size
    views = [ex.views for ex in examples if ex.views is not None]
    positions = [ex.positions for ex in examples if ex.views is not None]
    targets = [ex.target for ex in examples if ex.output_image and ex.target is not None]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "images": torch.cat(views) if views else torch.zeros(0, 3, s, s),
        "image_positions": torch.cat(positions).float() if positions else torch.zeros(0, 2),
        "input_image_mask": input_image_mask,
        "output_image_mask": output_image_mask,
        "target_images": torch.stack(targets) if targets else torch.zeros(0, 3, s, s),
        "task_ids": torch.tensor([ex.task_id for ex in examples], dtype=torch.long),
        "example_ids": [ex.example_id for ex in examples],
    }
