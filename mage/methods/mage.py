"""MAGE: per-task LoRA group masking + per-example Fisher + PEMA (docs/METHOD.md sections 2-4).

Per optimizer step: the Fisher sums accumulated by the LoRA backward over the step's micro-batches are
summed over data-parallel ranks with their example counts, turned into a mean, and drive the PEMA update
of every trainable group's A and B with the step's averaged, unclipped gradient. At the end of the task
the LoRA parameters take their EMA values.

What each mode reads (docs/METHOD.md, "PEMA"):
- paper, taylor: this step's mean Fisher F and gradient g;
- fisher: like with like: F = the running mean of this task's Fisher so far, F_prev = the mean over the
  finished tasks that trained the entry of their per-task mean Fisher;
- fixed: nothing: Fisher tracking and its all-reduce are off.
With ``pema_horizon`` h > 0 the constant beta of fixed (and the base b of fisher) is 1 - 1/(h N) for a
task of N steps: the EMA averages over a fraction h of the task instead of trailing it by ~100 steps.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mage import pema
from mage.lora import set_example_scale
from mage.ops import pema_update_multi_
from mage.methods.base import GradGetter, all_reduce_fisher_, copy_state_, lora_group_params
from mage.methods.finetune import GroupMasked


class MAGE(GroupMasked):
    name = "mage"
    config_fields = ("pema_mode", "lam", "beta_min", "beta_max", "fixed_beta", "pema_horizon")

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        if cfg.pema_mode not in pema.PEMA_MODES:
            raise ValueError(f"unknown PEMA mode {cfg.pema_mode!r}; choose one of {pema.PEMA_MODES}")
        self.pema_kwargs = dict(lam=cfg.lam, beta_min=cfg.beta_min, beta_max=cfg.beta_max, mode=cfg.pema_mode,
                                fixed_beta=cfg.fixed_beta)
        self.ema: dict[str, torch.Tensor] = {}
        self._grads: list[torch.Tensor] = []
        self.reads_fisher = cfg.pema_mode != "fixed"
        # "fisher" mode: F_prev per group parameter = mean over the finished tasks that trained it of their
        # per-task mean Fisher (with that count of tasks), and this task's running Fisher sum and example count.
        self.uses_prev = cfg.pema_mode == "fisher"
        self.fisher_prev: dict[str, torch.Tensor] = {}
        self.prev_tasks: dict[str, torch.Tensor] = {}
        self.task_fisher: dict[str, torch.Tensor] = {}
        self.task_count = torch.zeros((), dtype=torch.float64, device=self.modules[0].fisher_count.device)
        if self.uses_prev:
            self.fisher_prev = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in lora_group_params(model)}
            self.prev_tasks = {n: torch.zeros((), dtype=torch.float32, device=p.device)
                               for n, p in lora_group_params(model)}

    def task_beta(self, steps: int | None) -> float:
        """The constant beta of this task: from the horizon when set (needs the task's step count)."""
        if self.cfg.pema_horizon <= 0:
            return self.cfg.fixed_beta
        if not steps:
            raise ValueError("method.pema_horizon > 0 needs the task's number of steps (set steps_in_task)")
        return 1.0 - 1.0 / max(1.0, self.cfg.pema_horizon * steps)

    def _trainable_lora(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(lora_group_params(self.model, self.groups))

    def on_task_start(self, task_groups: Sequence[int]) -> None:
        super().on_task_start(task_groups)
        self.pema_kwargs["fixed_beta"] = self.task_beta(self.steps_in_task)
        for m in self.modules:
            m.reset_fisher()
            m.track_fisher = self.reads_fisher
        named = self._trainable_lora()
        self.ema = {n: p.detach().float().clone() for n, p in named}
        self._grads = [torch.zeros_like(p, dtype=torch.float32 if not self.reads_fisher else p.dtype) for _, p in named]
        if self.uses_prev:
            self.task_fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
            self.task_count.zero_()

    def before_backward(self, micro_batch_size: int, accumulation: int) -> None:
        if not self.reads_fisher:
            return
        # The backward loss is mean_n(L_n) / accumulation, so example n's own gradient is the gradient
        # reaching its rows times B * accumulation: that is c_n.
        c = torch.full((micro_batch_size,), float(micro_batch_size * accumulation),
                       device=self.modules[0].fisher_A.device)
        set_example_scale(self.model, c)

    def before_clip(self, grad_of: GradGetter) -> None:
        if not self.reads_fisher:
            return
        for buf, (_, p) in zip(self._grads, self._trainable_lora()):
            g = grad_of(p)
            if g is None:
                buf.zero_()
            else:
                buf.copy_(g)

    def _fisher_slices(self, m, g: int, mean_a: torch.Tensor, mean_b: torch.Tensor):
        rows = slice(g * m.rank, (g + 1) * m.rank)
        return mean_a[rows].contiguous(), mean_b[:, rows].contiguous()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if not self.reads_fisher:  # fixed: beta is a constant, no Fisher, no all-reduce
            named = self._trainable_lora()
            # fixed reads neither g nor F: the (zero, never written) gradient buffers stand in for both.
            pema_update_multi_([self.ema[n] for n, _ in named], [p for _, p in named], self._grads, self._grads,
                               **self.pema_kwargs)
            return
        all_reduce_fisher_(self.modules)
        if self.uses_prev:
            self.task_count.add_(self.modules[0].fisher_count)
            # The clamp keeps a task without examples at F = 0 without a host sync to check it.
            task_count = self.task_count.clamp_min(1.0).float()
        emas, params, fishers, prevs = [], [], [], []
        names = iter(self.ema)
        for m in self.modules:
            # count >= 1 whenever backward ran; the clamp keeps a step without examples at F = 0
            # without a host sync to check it.
            count = m.fisher_count.clamp_min(1.0).float()
            for g in self.groups:
                fa, fb = self._fisher_slices(m, g, m.fisher_A, m.fisher_B)
                for p, f_sum in ((m.lora_A_groups[g], fa), (m.lora_B_groups[g], fb)):
                    name = next(names)
                    emas.append(self.ema[name])
                    params.append(p)
                    if self.uses_prev:  # like with like: this task's running mean against earlier tasks' mean
                        self.task_fisher[name].add_(f_sum)
                        fishers.append(self.task_fisher[name] / task_count)
                        prevs.append(self.fisher_prev[name])
                    else:
                        fishers.append(f_sum / count)
        pema_update_multi_(emas, params, self._grads, fishers, fisher_prevs=prevs if self.uses_prev else None,
                           **self.pema_kwargs)
        for m in self.modules:
            m.reset_fisher()

    @torch.no_grad()
    def on_task_end(self) -> None:
        for name, p in self._trainable_lora():
            p.copy_(self.ema[name].to(p.dtype))
        if self.uses_prev:
            count = self.task_count.clamp_min(1.0).float()
            for name, f in self.task_fisher.items():  # running mean over the tasks that trained the entry
                k = self.prev_tasks[name]
                self.fisher_prev[name].mul_(k / (k + 1)).add_(f / count / (k + 1))
                k.add_(1.0)
            self.task_fisher = {}
            self.task_count.zero_()
        for m in self.modules:
            m.track_fisher = False
            m.reset_fisher()
        set_example_scale(self.model, None)
        self.ema, self._grads = {}, []

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ema.{n}": t for n, t in self.ema.items()}
        state.update({f"fisher_prev.{n}": t for n, t in self.fisher_prev.items()})
        state.update({f"prev_tasks.{n}": t for n, t in self.prev_tasks.items()})
        state.update({f"task_fisher.{n}": t for n, t in self.task_fisher.items()})
        if self.uses_prev:
            state["task_count"] = self.task_count
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores what ``state_dict`` wrote; call after ``on_task_start`` of the task being resumed."""
        targets = {f"ema.{n}": t for n, t in self.ema.items()}
        targets.update({f"fisher_prev.{n}": t for n, t in self.fisher_prev.items()})
        targets.update({f"prev_tasks.{n}": t for n, t in self.prev_tasks.items()})
        targets.update({f"task_fisher.{n}": t for n, t in self.task_fisher.items()})
        if self.uses_prev:
            targets["task_count"] = self.task_count
        copy_state_(targets, state, "MAGE state does not match this task's trainable groups")
