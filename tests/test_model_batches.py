"""Hand-built SEED-X batches (the dict of docs/DESIGN.md "Model") for the model tests.

The collate function of mage.data produces the same dict; these builders are independent of it so
the model can be tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100
KINDS = ("text", "vqa", "tiles", "gen", "edit")


@dataclass
class Example:
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    input_image: list[bool] = field(default_factory=list)
    output_image: list[bool] = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)
    positions: list[tuple[float, float]] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)

    def add(self, ids: list[int], supervised: bool = False, input_image: bool = False, output_image: bool = False,
            labels: list[int] | None = None) -> None:
        self.ids += ids
        self.labels += labels if labels is not None else (ids if supervised else [IGNORE] * len(ids))
        self.input_image += [input_image] * len(ids)
        self.output_image += [output_image] * len(ids)


def _text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _image_tokens(tokenizer, q: int) -> list[int]:
    return tokenizer.convert_tokens_to_ids([f"<img_{i:05d}>" for i in range(q)])


def _view(ex: Example, tokenizer, q: int, size: int, gen: torch.Generator, position, start: str, end: str) -> None:
    ex.add(tokenizer.convert_tokens_to_ids([start]))
    ex.add(_image_tokens(tokenizer, q), input_image=True)
    ex.add(tokenizer.convert_tokens_to_ids([end]))
    ex.views.append(torch.randn(3, size, size, generator=gen))
    ex.positions.append(position)


def make_example(tokenizer, kind: str, gen: torch.Generator, q: int = 16, size: int = 112,
                 words: int = 0, prompt_only: bool = False) -> Example:
    """One training example of `kind` (see KINDS) in SEED-X's layout; `words` pads the question.

    prompt_only: stop after "[/INST]\n" (an evaluation prompt)."""
    ex = Example()
    ex.add([tokenizer.bos_token_id])
    ex.add(_text(tokenizer, "[INST] "))
    if kind in ("vqa", "tiles", "edit"):
        if kind == "tiles":  # a 1x2 grid: tiles row-major, then the global view
            _view(ex, tokenizer, q, size, gen, (0.25, 0.5), "<patch>", "</patch>")
            _view(ex, tokenizer, q, size, gen, (0.75, 0.5), "<patch>", "</patch>")
        _view(ex, tokenizer, q, size, gen, (0.5, 0.5), "<img>", "</img>")
    question = {"text": "What shape is the red object?", "vqa": "What color is the circle?",
                "tiles": "How many objects are in the image?", "gen": "a red circle in the top left",
                "edit": "Make the circle blue."}[kind]
    question = " ".join([question] + ["the"] * words)
    ex.add(_text(tokenizer, f"{question} [/INST]\n"))
    if prompt_only:
        return ex
    if kind in ("gen", "edit"):
        # <img> is supervised; the <img_i> tokens and </img> are not (SEED-X).
        ex.add(tokenizer.convert_tokens_to_ids(["<img>"]), supervised=True)
        ex.add(_image_tokens(tokenizer, q), output_image=True)
        ex.add(tokenizer.convert_tokens_to_ids(["</img>"]))
        ex.targets.append(torch.randn(3, size, size, generator=gen))
    else:
        # answers of different lengths, so a batch-level token mean differs from the per-example mean
        answer = {"text": "a red circle in the top left", "vqa": "red", "tiles": "12"}[kind]
        ex.add(_text(tokenizer, answer), supervised=True)
    ex.add([tokenizer.eos_token_id], supervised=True)
    return ex


def collate(examples: list[Example], pad_id: int, padding: str = "right", size: int = 112,
            drop_empty_images: bool = False) -> dict:
    """Pad to the longest example (right for training, left for generation) and stack images."""
    length = max(len(ex.ids) for ex in examples)

    def pad(values: list, fill) -> list:
        extra = [fill] * (length - len(values))
        return values + extra if padding == "right" else extra + values

    views = [v for ex in examples for v in ex.views]
    targets = [t for ex in examples for t in ex.targets]
    batch = {
        "input_ids": torch.tensor([pad(ex.ids, pad_id) for ex in examples]),
        "attention_mask": torch.tensor([pad([1] * len(ex.ids), 0) for ex in examples]),
        "labels": torch.tensor([pad(ex.labels, IGNORE) for ex in examples]),
        "input_image_mask": torch.tensor([pad(ex.input_image, False) for ex in examples]),
        "output_image_mask": torch.tensor([pad(ex.output_image, False) for ex in examples]),
        "images": torch.stack(views) if views else torch.zeros(0, 3, size, size),
        "image_positions": torch.tensor([p for ex in examples for p in ex.positions]).view(-1, 2),
        "target_images": torch.stack(targets) if targets else torch.zeros(0, 3, size, size),
        "task_ids": torch.zeros(len(examples), dtype=torch.long),
        "example_ids": [f"ex{i}" for i in range(len(examples))],
    }
    if drop_empty_images:
        for key in ("images", "image_positions", "target_images"):
            if batch[key].shape[0] == 0:
                del batch[key]
    return batch


def test_collate_follows_the_batch_contract():
    from mage.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("tiny")
    gen = torch.Generator().manual_seed(0)
    examples = [make_example(tokenizer, kind, gen) for kind in KINDS]
    batch = collate(examples, tokenizer.pad_token_id)
    b, t = batch["input_ids"].shape
    assert b == len(KINDS) and batch["labels"].shape == (b, t)
    num_views = batch["images"].shape[0]
    assert num_views == 1 + 3 + 1  # vqa, tiles (2 tiles + global), edit
    assert int(batch["input_image_mask"].sum()) == num_views * 16
    assert int(batch["output_image_mask"].sum()) == batch["target_images"].shape[0] * 16 == 2 * 16
    assert batch["image_positions"].shape == (num_views, 2)
