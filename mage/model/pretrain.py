"""Pretrain the tiny SEED-X (ViT included) into a base model for Continual-NExT-mini.

    python -m mage.model.pretrain --out DIR --seed N [--steps S --batch-size B --lr LR]

writes DIR/tiny-base-seed{N}.safetensors: every weight of the tiny SeedXModel after S AdamW steps on
the pretraining mixture of `mage.data.pretrain_mix` (general skills, none of the six tasks). Deterministic
on CPU for a given seed and thread count. The continual phase then starts from this base, as the paper's
starts from a pretrained SEED-X (docs/METHOD.md, "The tiny base model").

The trainer finds the base without being asked (`model.base = "auto"` in the mini preset): the file
committed under assets/ when its key matches the current tiny model, tokenizer and mixture, otherwise a
copy built on first use into the cache folder (MAGE_CACHE, default ~/.cache/mage).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from mage.data.collate import collate
from mage.data.images import ImageConfig
from mage.data.pretrain_mix import SKILL_WEIGHTS, SKILLS, pretrain_examples
from mage.model.build import build_model
from mage.model.config import get_config

REPO_ASSETS = Path(__file__).resolve().parents[2] / "assets"
# Change when the recipe changes in a way the key below cannot see (e.g. a drawing routine).
RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.05


def base_key(cfg: PretrainConfig, tokenizer) -> str:
    """What the base depends on: the model sizes, the vocabulary, the mixture and the recipe."""
    blob = json.dumps({"model": dataclasses.asdict(get_config("tiny")), "vocab": sorted(tokenizer.get_vocab().items()),
                       "skills": [SKILLS, SKILL_WEIGHTS], "pretrain": dataclasses.asdict(cfg),
                       "recipe": RECIPE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_name(seed: int) -> str:
    return f"tiny-base-seed{seed}.safetensors"


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(cfg: PretrainConfig, out: str | Path, progress: bool = True, log_every: int = 100) -> Path:
    """Train the whole tiny model on the mixture and write it atomically; returns the file."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    model = build_model("tiny")
    tokenizer, image_cfg = model.tokenizer, ImageConfig.tiny()
    key = base_key(cfg, tokenizer)
    model.vision_trainable = True
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    model.visual_encoder.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    bar = tqdm(total=cfg.steps, desc="pretraining the tiny base", disable=not progress, unit="step")
    t0 = time.time()
    for step in range(cfg.steps):
        examples = pretrain_examples(cfg.batch_size, cfg.seed * 1_000_003 + step, image_cfg)
        batch = collate(examples, tokenizer, image_cfg, mode="train")
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        out_ = model(batch)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            # .item() on logging steps only
            bar.set_postfix(lm=f"{out_.lm_loss.item():.3f}", rec=f"{out_.rec_loss.item():.3f}")
    bar.close()
    model.vision_trainable = False
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / file_name(cfg.seed)
    tmp = path.with_suffix(".tmp")
    meta = {"key": key, "pretrain": json.dumps(dataclasses.asdict(cfg)), "seconds": f"{time.time() - t0:.0f}",
            "torch": torch.__version__}
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def file_key(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("key")


def cache_dir() -> Path:
    return Path(os.environ.get("MAGE_CACHE", Path.home() / ".cache" / "mage"))


def resolve_base(seed: int = 0, tokenizer=None, build: bool = True, progress: bool = True) -> Path:
    """The tiny base for ``seed`` with the current key: the committed file, a cached one, or a new build."""
    cfg = PretrainConfig(seed=seed)
    if tokenizer is None:
        from mage.data.tokenizer import build_tokenizer
        tokenizer = build_tokenizer("tiny")
    key = base_key(cfg, tokenizer)
    for folder in (REPO_ASSETS, cache_dir()):
        path = folder / file_name(seed)
        if path.is_file() and file_key(path) == key:
            return path
    if not build:
        raise FileNotFoundError(f"no tiny base for seed {seed} with key {key} in {REPO_ASSETS} or {cache_dir()}; "
                                f"build it with: python -m mage.model.pretrain --out {cache_dir()} --seed {seed}")
    print(f"building the tiny base model (seed {seed}, key {key}) into {cache_dir()}: a few minutes, once",
          flush=True)
    return pretrain(cfg, cache_dir(), progress=progress)


def load_base_(model, path: str | Path) -> None:
    """Copy a pretrained base into a freshly built tiny model (before LoRA wrapping), every key checked."""
    state = load_file(str(path))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} is not a base of this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"mis-shaped {shapes[:3]}; rebuild it with python -m mage.model.pretrain")
    model.load_state_dict(state)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mage.model.pretrain", description=__doc__.split("\n")[0])
    d = PretrainConfig()
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = dataclasses.replace(d, seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr)
    path = pretrain(cfg, a.out, progress=not a.no_progress)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"wrote {path} (key {file_key(path)}, sha256 {digest})")


if __name__ == "__main__":
    main()
