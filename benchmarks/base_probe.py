"""Where a tiny base loses what its images show: linear probes of the ViT's tokens and of the input resampler's.

    python benchmarks/base_probe.py                  # the base the mini preset uses
    python benchmarks/base_probe.py --base PATH --train 2500 --test 500

The LLM reads an image only through the input resampler's tokens. A linear head is fitted (Adam, on
standardised features) to predict the dense labels of `mage.data.pretrain_mix.VISION_HEADS` (each 3x3 cell's
colour and shape, the object class, the digits, the text colour) from (a) the ViT's output tokens, (b) the
input resampler's tokens, flattened, and (c) the mean of the resampler's tokens (what content-based attention
can read without knowing a token's place). Accuracy is on held-out images; for the cells, over non-empty
cells only. A label the ViT holds and the resampler loses cannot reach the LLM.

It also measures whether the image tokens are local: on images of one shape, how often the token that
changes most from the empty image is the token over the shape's centre (chance: 1 in 64 for the ViT's
tokens, 1 in 16 for the resampler's).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mage, not an installed one

from mage.data import vocab  # noqa: E402
from mage.data.images import to_tensor  # noqa: E402
from mage.data.mini import position_xy, render_objects  # noqa: E402
from mage.data.pretrain_mix import VISION_HEADS, vision_example  # noqa: E402
from mage.model.build import build_model  # noqa: E402
from mage.model.pretrain import load_base_, resolve_base  # noqa: E402


def probe_accuracy(features: torch.Tensor, labels: list[dict], n_train: int, steps: int = 150) -> dict[str, float]:
    """Held-out accuracy per label head of a linear probe on ``features`` (N, ...), trained on the first n_train."""
    x = features.flatten(1)
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-5)
    out = {}
    for name, (n, k) in VISION_HEADS.items():
        y = torch.tensor([lab[name] for lab in labels])
        w = torch.zeros(x.shape[1], n * k, requires_grad=True)
        opt = torch.optim.Adam([w], lr=1e-2)
        for _ in range(steps):
            logits = (x[:n_train] @ w).reshape(-1, k)
            loss = torch.nn.functional.cross_entropy(logits, y[:n_train].reshape(-1)) + 1e-4 * w.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = (x[n_train:] @ w).reshape(-1, n, k).argmax(-1)
        held = y[n_train:]
        counted = held != 0 if name.startswith("cell_") else torch.ones_like(held, dtype=torch.bool)
        out[name] = 100.0 * (pred == held)[counted].float().mean().item()
    return out


@torch.no_grad()
def image_tokens(model, n: int, seed: int = 0, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(ViT tokens, input-resampler tokens, labels) of n generated images."""
    size, rng = model.config.vision.image_size, random.Random(f"probe-{seed}")
    examples = [vision_example(rng, size) for _ in range(n)]
    vit, res = [], []
    for i in range(0, n, batch):
        images = torch.stack([to_tensor(img, size) for img, _ in examples[i:i + batch]])
        vit.append(model.visual_encoder(images))
        res.append(model.input_resampler(vit[-1]))
    return torch.cat(vit), torch.cat(res), [lab for _, lab in examples]


@torch.no_grad()
def token_locality(encoders: dict, size: int, n: int = 200, seed: int = 0) -> dict[str, float]:
    """Percent of n one-shape images whose most-changed token (against the empty image) lies over the
    shape's centre, for each encoder {name: images (N, 3, size, size) -> tokens (N, L, C), L square}."""
    rng = random.Random(f"locality-{seed}")
    shapes = [(rng.choice(vocab.SHAPES), rng.choice(tuple(vocab.COLORS)),
               *position_xy(rng, size, rng.choice(vocab.CELL_NAMES)), size // 8) for _ in range(n)]
    images = torch.stack([to_tensor(render_objects([s], size), size) for s in shapes])
    empty = to_tensor(render_objects([], size), size)[None]
    out = {}
    for name, encode in encoders.items():
        tokens, base = encode(images), encode(empty)
        grid = int(tokens.shape[1] ** 0.5)
        changed = (tokens - base).norm(dim=-1).argmax(dim=1)
        over = torch.tensor([min(grid - 1, y * grid // size) * grid + min(grid - 1, x * grid // size)
                             for _, _, x, y, _ in shapes])
        out[name] = 100.0 * (changed == over).float().mean().item()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="", help="a tiny base (.safetensors); default: the mini preset's")
    p.add_argument("--train", type=int, default=2500)
    p.add_argument("--test", type=int, default=500)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = build_model("tiny")
    load_base_(model, Path(a.base) if a.base else resolve_base(0, model.tokenizer))
    model.eval()
    vit, res, labels = image_tokens(model, a.train + a.test)
    print("features".ljust(28) + "".join(h.rjust(12) for h in VISION_HEADS))
    for label, feats in (("ViT tokens (flattened)", vit), ("resampler tokens (flattened)", res),
                         ("resampler tokens (mean)", res.mean(1, keepdim=True))):
        acc = probe_accuracy(feats, labels, a.train)
        print(label.ljust(28) + "".join(f"{acc[h]:12.1f}" for h in VISION_HEADS), flush=True)
    local = token_locality({"ViT": model.visual_encoder,
                            "resampler": lambda x: model.input_resampler(model.visual_encoder(x))},
                           model.config.vision.image_size)
    print("tokens that are local (%): " + ", ".join(f"{k} {v:.1f}" for k, v in local.items()))


if __name__ == "__main__":
    main()
