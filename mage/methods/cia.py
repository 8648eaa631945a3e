"""CIA's dynamic EMA on the LoRA baseline, without instruction grouping (docs/METHOD.md section 5), following
He et al., "Continual Instruction Tuning for Large Multimodal Models" (2023).

The "tensor" of the method is each adapted linear's whole rank-(G r) LoRA A and whole B (PEFT's layout:
one lora_A and one lora_B per layer), not our per-group slices: the norms below sum over all groups of a
layer's A (or B). From the second task on, per such tensor and optimizer step, with g the step's averaged unclipped
gradient:  a = |θ - θ*|_1, b = |g|_1, c = |g - g_prev|_1, α = 2 (1 + b) / (a c), α := α if 0 < α < 1
else 0.01, θ* = (1 - α) θ* + α θ, g_prev = g. At the end of the task θ = θ*. g_prev starts at 0 on each
task, so the first step's c is |g|_1. Only the LoRA tensors are averaged; the other trainables keep their
trained values (as MAGE's swap does, docs/METHOD.md section 4).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mage.lora import iter_multi_lora
from mage.methods.base import GradGetter, copy_state_, lora_group_params
from mage.methods.finetune import SequentialLoRA

FALLBACK_ALPHA = 0.01


def cia_alpha(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """α = 2 (1 + b) / (a c) where that lies in (0, 1), else 0.01 (a c = 0 gives inf, hence 0.01)."""
    alpha = 2.0 * (1.0 + b) / (a * c)
    return torch.where((alpha > 0) & (alpha < 1), alpha, torch.full_like(alpha, FALLBACK_ALPHA))


class CIA(SequentialLoRA):
    name = "cia"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.named = list(lora_group_params(model))
        # The stacked tensors: per layer, the indices (into self.named) of its A groups, then of its B groups.
        index = {n: i for i, (n, _) in enumerate(self.named)}
        self.stacked: list[list[int]] = []
        for layer, m in iter_multi_lora(model):
            for kind in ("lora_A_groups", "lora_B_groups"):
                self.stacked.append([index[f"{layer}.{kind}.{g}"] for g in range(m.num_groups)])
        self.tasks_done = torch.zeros((), dtype=torch.int64)  # on the CPU: read once per task, never per step
        self.ema: dict[str, torch.Tensor] = {}
        self.g_prev: dict[str, torch.Tensor] = {}
        self._grads: list[torch.Tensor] = []

    def on_task_start(self, task_groups: Sequence[int]) -> None:
        super().on_task_start(task_groups)
        self.ema, self.g_prev, self._grads = {}, {}, []
        if int(self.tasks_done) >= 1:
            self._start_averaging()

    def _start_averaging(self) -> None:
        self.ema = {n: p.detach().float().clone() for n, p in self.named}
        self.g_prev = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.named}
        self._grads = [torch.zeros_like(p, dtype=torch.float32) for _, p in self.named]

    def before_clip(self, grad_of: GradGetter) -> None:
        for buf, (_, p) in zip(self._grads, self.named):
            g = grad_of(p)
            if g is None:
                buf.zero_()
            else:
                buf.copy_(g)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if not self.ema:  # task 1: plain LoRA
            return
        for members in self.stacked:
            parts = [(self.named[i][0], self.named[i][1].float(), self._grads[i]) for i in members]
            # Small reductions summed over the layer's groups, kept on the device: α never goes through the host.
            a = sum((theta - self.ema[n]).abs().sum() for n, theta, _ in parts)
            b = sum(g.abs().sum() for _, _, g in parts)
            c = sum((g - self.g_prev[n]).abs().sum() for n, _, g in parts)
            alpha = cia_alpha(a, b, c)
            for n, theta, g in parts:
                self.ema[n].lerp_(theta, alpha)
                self.g_prev[n].copy_(g)

    @torch.no_grad()
    def on_task_end(self) -> None:
        for name, p in self.named:
            if name in self.ema:
                p.copy_(self.ema[name].to(p.dtype))
        self.ema, self.g_prev, self._grads = {}, {}, []
        self.tasks_done += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"tasks_done": self.tasks_done}
        state.update({f"ema.{n}": t for n, t in self.ema.items()})
        state.update({f"g_prev.{n}": t for n, t in self.g_prev.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores what ``state_dict`` wrote: at a task boundary before ``on_task_start``, mid-task after it."""
        if "tasks_done" not in state:
            raise ValueError(f"CIA state lacks tasks_done (keys {sorted(state)[:3]}...): written by another method?")
        self.tasks_done.copy_(state["tasks_done"])
        if any(k.startswith("ema.") for k in state) and not self.ema:
            # A mid-task resume: this process started the task before it knew that tasks had been done.
            self._start_averaging()
        targets = {f"ema.{n}": t for n, t in self.ema.items()}
        targets.update({f"g_prev.{n}": t for n, t in self.g_prev.items()})
        copy_state_(targets, state, "CIA state does not match this task", ignore=frozenset({"tasks_done"}))
