"""How one optimizer step is executed: plain/DDP (default) or DeepSpeed ZeRO (GPU, optional).

Both expose the same calls so the loop reads the same for either:
``accumulating(last)`` context per micro-batch, ``backward(loss_mean, last)``, ``grad_of(p)`` (the averaged,
unclipped gradient), ``clip()``, ``step()``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mage.trainer.config import ConfigError
from mage.trainer.distributed import DistInfo
from mage.trainer.optim import build_optimizer, build_scheduler


class DDPEngine:
    """Single process or DistributedDataParallel; rebuilt per task because the trainable set changes."""

    sharded_state = False  # optimizer state identical on every rank: rank 0 saves it

    def __init__(self, model: nn.Module, param_groups: list[dict], optim_cfg, train_cfg, total_steps: int,
                 info: DistInfo):
        self.module = model
        self.accumulation = train_cfg.grad_accum
        self.max_norm = optim_cfg.grad_clip
        self.params = [p for g in param_groups for p in g["params"]]
        if info.distributed:
            # The Fisher buffers are per-rank partial sums (the method all-reduces them after each step):
            # DDP must not overwrite them with rank 0's before each forward. (At construction they are 0.)
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                              else {"broadcast_buffers": False})
            self.wrapped = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                               find_unused_parameters=train_cfg.find_unused_parameters, **no_buffer_sync)
        else:
            self.wrapped = model
        self.optimizer = build_optimizer(param_groups, optim_cfg, info.device)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)

    def forward(self, batch: dict):
        return self.wrapped(batch)

    def accumulating(self, last: bool):
        """Skip DDP's gradient all-reduce on all micro-batches but the last of a step."""
        if isinstance(self.wrapped, DDP) and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss_mean: torch.Tensor, last: bool) -> None:
        (loss_mean / self.accumulation).backward()

    def grad_of(self, p: nn.Parameter) -> torch.Tensor | None:
        return p.grad

    def clip(self) -> torch.Tensor | None:
        if self.max_norm <= 0:
            return None
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def check_engine(train_cfg, device) -> None:
    """Fail before any work when the chosen engine cannot run here."""
    if train_cfg.engine != "deepspeed":
        return
    if device.type != "cuda":
        raise ConfigError("train.engine=deepspeed runs on CUDA only; use train.engine=ddp on CPU")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.engine=deepspeed needs DeepSpeed: `pip install deepspeed` on a CUDA machine, "
                          "or use train.engine=ddp")


class DeepSpeedEngine(DDPEngine):
    """ZeRO stage 1/2 through ``deepspeed.initialize`` with our AdamW and schedule (GPU only).

    DeepSpeed scales the loss by 1/accumulation itself, clips inside ``step`` and keeps gradients in
    partitions, so the unclipped full gradient of a parameter comes from ``safe_get_full_grad``.
    """

    sharded_state = True  # ZeRO partitions the optimizer state: every rank saves its own

    def __init__(self, model: nn.Module, param_groups: list[dict], optim_cfg, train_cfg, total_steps: int,
                 info: DistInfo, bf16: bool):
        try:
            import deepspeed
        except ImportError:
            raise RuntimeError("train.engine=deepspeed needs DeepSpeed: `pip install deepspeed` on a CUDA machine, "
                               "or use train.engine=ddp") from None
        if info.device.type != "cuda":
            raise RuntimeError("train.engine=deepspeed runs on CUDA only; use train.engine=ddp on CPU")
        self._ds = deepspeed
        self.module = model
        self.accumulation = train_cfg.grad_accum
        self.max_norm = optim_cfg.grad_clip
        self.params = [p for g in param_groups for p in g["params"]]
        optimizer = build_optimizer(param_groups, optim_cfg, info.device)
        scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
        ds_config = {
            "train_micro_batch_size_per_gpu": train_cfg.batch_size,
            "gradient_accumulation_steps": train_cfg.grad_accum,
            "gradient_clipping": max(0.0, optim_cfg.grad_clip),
            "bf16": {"enabled": bf16},
            "zero_optimization": {"stage": train_cfg.zero_stage},
            "steps_per_print": 10**9,
        }
        self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed skips the reduction off the accumulation boundary itself

    def backward(self, loss_mean: torch.Tensor, last: bool) -> None:
        self.wrapped.backward(loss_mean)
        if not last:
            self.wrapped.step()  # only advances DeepSpeed's micro-step counter off the boundary

    def grad_of(self, p: nn.Parameter) -> torch.Tensor | None:
        return self._ds.utils.safe_get_full_grad(p)

    def clip(self) -> torch.Tensor | None:
        return None  # inside step (gradient_clipping)

    def step(self) -> None:
        self.wrapped.step()


def build_engine(model: nn.Module, param_groups: list[dict], optim_cfg, train_cfg, total_steps: int,
                 info: DistInfo, bf16: bool) -> DDPEngine:
    if train_cfg.engine == "deepspeed":
        return DeepSpeedEngine(model, param_groups, optim_cfg, train_cfg, total_steps, info, bf16)
    return DDPEngine(model, param_groups, optim_cfg, train_cfg, total_steps, info)
