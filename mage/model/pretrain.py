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

from mage.data import vocab
from mage.data.collate import collate
from mage.data.images import ImageConfig
from mage.data.pretrain_mix import SKILL_WEIGHTS, SKILLS, VISION_HEADS, pretrain_examples
from mage.model.build import build_model
from mage.model.config import get_config

REPO_ASSETS = Path(__file__).resolve().parents[2] / "assets"
# Change when the recipe changes in a way the key below cannot see (e.g. a drawing routine).
RECIPE_VERSION = 5


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    vision_steps: int = 1800            # stage 1: the ViT alone, dense labels (VISION_HEADS)
    vision_batch_size: int = 32
    vision_lr: float = 2e-3
    connector_steps: int = 1800         # stage 1b: the input resampler alone, per-token region labels
    connector_lr: float = 2e-3
    steps: int = 10000                  # stage 2: the rest of the model on the mixture, ViT and input resampler frozen
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.05


def base_key(cfg: PretrainConfig, tokenizer) -> str:
    """What the base depends on: the model sizes, the vocabulary, the mixture (its skills and prompts) and the recipe."""
    prompts = [vocab.PRETRAIN_PROMPTS, vocab.PRETRAIN_SUFFIXES, vocab.PRETRAIN_DESCRIBE_OBJECT, vocab.PRETRAIN_DESCRIBE_CLASS]
    blob = json.dumps({"model": dataclasses.asdict(get_config("tiny")), "vocab": sorted(tokenizer.get_vocab().items()),
                       "skills": [SKILLS, SKILL_WEIGHTS, VISION_HEADS], "prompts": prompts,
                       "pretrain": dataclasses.asdict(cfg),
                       "recipe": RECIPE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_name(seed: int) -> str:
    return f"tiny-base-seed{seed}.safetensors"


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _adamw(params: list[torch.nn.Parameter], cfg: PretrainConfig, lr: float) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _head_stage_step_(loss: torch.Tensor, params: list, opt, lr: float, bar, step: int) -> None:
    """One AdamW step of a stage trained through a discarded head (1 and 1b), clipped at 1.0."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    bar.update(1)
    if (step + 1) % 50 == 0:
        bar.set_postfix(loss=f"{loss.item():.3f}")  # .item() on logging steps only


def _heads_loss(logits: torch.Tensor, labels: list[dict], heads: dict[str, tuple[int, int]],
                loss: torch.Tensor | float = 0.0) -> torch.Tensor:
    """`loss` plus the cross-entropy of each labelled head read off the last dim of `logits`, in order:
    head `name` holds m groups of k classes and each label dict gives its m (or m x tokens) class ids."""
    sizes = [m * k for m, k in heads.values()]
    for part, (name, (_, k)) in zip(logits.split(sizes, dim=-1), heads.items()):
        target = torch.tensor([lab[name] for lab in labels])
        loss = loss + torch.nn.functional.cross_entropy(part.reshape(-1, k), target.reshape(-1))
    return loss


def _region_loss(head: torch.nn.Linear, tokens: torch.Tensor, scenes: list, size: int) -> torch.Tensor:
    """Cross-entropy of each image token's own region labels (`pretrain_mix.region_labels`)."""
    from mage.data.pretrain_mix import REGION_CLASSES, region_labels

    grid = math.isqrt(tokens.shape[1])
    labels = [region_labels(objs, grid, size) for objs in scenes]
    return _heads_loss(head(tokens), labels, {name: (1, k) for name, k in REGION_CLASSES.items()})


def _region_batch(rng, n: int, size: int) -> tuple[list, torch.Tensor]:
    from mage.data.images import to_tensor
    from mage.data.mini import render_objects
    from mage.data.pretrain_mix import region_scene

    scenes = [region_scene(rng, size) for _ in range(n)]
    return scenes, torch.stack([to_tensor(render_objects(objs, size), size) for objs in scenes])


def pretrain_vision_(model, cfg: PretrainConfig, progress: bool = True) -> None:
    """Stage 1: the ViT learns to see the mini world from dense labels (linear heads on its output tokens,
    discarded afterwards), as a real ViT is pretrained before the multimodal stage: whole-image labels
    from all its tokens together, and each token's own region (`pretrain_mix.region_labels`)."""
    import random

    from tqdm.auto import tqdm

    from mage.data.images import to_tensor
    from mage.data.pretrain_mix import REGION_CLASSES, VISION_HEADS, vision_example

    vit, size = model.visual_encoder, model.config.vision.image_size
    vis = model.config.vision
    head = torch.nn.Linear(vis.num_queries * vis.output_dim, sum(n * k for n, k in VISION_HEADS.values()))
    region_head = torch.nn.Linear(vis.output_dim, sum(REGION_CLASSES.values()))
    for p in vit.parameters():
        p.requires_grad_(True)
    vit.train()
    params = list(vit.parameters()) + list(head.parameters()) + list(region_head.parameters())
    opt = _adamw(params, cfg, cfg.vision_lr)
    stage = dataclasses.replace(cfg, steps=cfg.vision_steps, lr=cfg.vision_lr)
    rng = random.Random(f"vision-{cfg.seed}")
    bar = tqdm(total=cfg.vision_steps, desc="pretraining the tiny ViT", disable=not progress, unit="step")
    for step in range(cfg.vision_steps):
        n = cfg.vision_batch_size
        examples = [vision_example(rng, size) for _ in range(n)]
        scenes, scene_images = _region_batch(rng, n, size)
        tokens = vit(torch.cat([torch.stack([to_tensor(img, size) for img, _ in examples]), scene_images]))
        loss = _heads_loss(head(tokens[:n].flatten(1)), [lab for _, lab in examples], VISION_HEADS,
                           _region_loss(region_head, tokens[n:], scenes, size))
        _head_stage_step_(loss, params, opt, _lr_at(step, stage), bar, step)
    bar.close()
    vit.requires_grad_(False).eval()


def pretrain_connector_(model, cfg: PretrainConfig, progress: bool = True) -> None:
    """Stage 1b: the input resampler learns to pass each part of the image to its own LLM token (region
    labels on its grid, a linear head discarded afterwards), over the frozen ViT."""
    import random

    from tqdm.auto import tqdm

    from mage.data.pretrain_mix import REGION_CLASSES

    resampler, vit, size = model.input_resampler, model.visual_encoder, model.config.vision.image_size
    head = torch.nn.Linear(resampler.embed_dim, sum(REGION_CLASSES.values()))
    params = [p for p in resampler.parameters() if p.requires_grad] + list(head.parameters())
    opt = _adamw(params, cfg, cfg.connector_lr)
    stage = dataclasses.replace(cfg, steps=cfg.connector_steps, lr=cfg.connector_lr)
    rng = random.Random(f"connector-{cfg.seed}")
    bar = tqdm(total=cfg.connector_steps, desc="pretraining the input resampler", disable=not progress, unit="step")
    for step in range(cfg.connector_steps):
        scenes, images = _region_batch(rng, cfg.vision_batch_size, size)
        with torch.no_grad():
            features = vit(images)
        loss = _region_loss(head, resampler(features), scenes, size)
        _head_stage_step_(loss, params, opt, _lr_at(step, stage), bar, step)
    bar.close()


def pretrain(cfg: PretrainConfig, out: str | Path, progress: bool = True, log_every: int = 100) -> Path:
    """Stage 1 (the ViT), 1b (the input resampler), then 2 (the rest of the model, on the mixture);
    writes the base atomically."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    model = build_model("tiny")
    tokenizer, image_cfg = model.tokenizer, ImageConfig.tiny()
    key = base_key(cfg, tokenizer)
    t0 = time.time()
    pretrain_vision_(model, cfg, progress)
    pretrain_connector_(model, cfg, progress)
    # Stage 2 keeps the input resampler as 1b left it: trained on the mixture, its tokens lost the shapes
    # that 1b put in them (docs/RESULTS_HISTORY.md "Where the shape is lost").
    params = [p for n, p in model.named_parameters() if not n.startswith(("visual_encoder.", "input_resampler."))]
    model.input_resampler.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()
    opt = _adamw(params, cfg, cfg.lr)
    bar = tqdm(total=cfg.steps, desc="pretraining the tiny base", disable=not progress, unit="step")
    for step in range(cfg.steps):
        examples = pretrain_examples(cfg.batch_size, cfg.seed * 1_000_003 + step, image_cfg)
        batch = collate(examples, tokenizer, image_cfg, mode="train")
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        out_ = model(batch)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            # .item() on logging steps only
            bar.set_postfix(lm=f"{out_.lm_loss.item():.3f}", rec=f"{out_.rec_loss.item():.3f}")
    bar.close()
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
    print(f"building the tiny base model (seed {seed}, key {key}) into {cache_dir()}: about 17 minutes on 2 CPU cores, once",
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
    p.add_argument("--vision-steps", type=int, default=d.vision_steps)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = dataclasses.replace(d, seed=a.seed, vision_steps=a.vision_steps, steps=a.steps, batch_size=a.batch_size,
                              lr=a.lr)
    path = pretrain(cfg, a.out, progress=not a.no_progress)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"wrote {path} (key {file_key(path)}, sha256 {digest})")


if __name__ == "__main__":
    main()
