"""AdamW and the cosine schedule with linear warmup and a floor (docs/METHOD.md section 8)."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(param_groups: list[dict], cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the method's parameter groups; fused on CUDA, foreach elsewhere."""
    if not any(g["params"] for g in param_groups):
        raise ValueError("no trainable parameters for this task: check method and LoRA settings")
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused, foreach=None if fused else True)


class WarmupCosine:
    """lr factor: linear from 1/warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``.

    A class (not a lambda) so the scheduler's state_dict stays picklable and resumable.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
