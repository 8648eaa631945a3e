"""EWC on the LoRA baseline (docs/METHOD.md section 5): a diagonal Fisher at the end of each task, a quadratic pull
towards that task's parameters while training the next ones.

The Fisher is our per-example one (docs/METHOD.md section 3), accumulated by the LoRA backward in one pass over
``ewc_samples`` examples of the finished task. The penalty is computed on the live parameters, so it
reaches the gradient (the public toolkits compute it on ``.data``, where it is a no-op).
"""
from __future__ import annotations

import torch

from mage.lora import MultiLoRALinear, iter_multi_lora, set_example_scale
from mage.methods.base import BatchSource, LossOf, all_reduce_fisher_, lora_group_params
from mage.methods.finetune import SequentialLoRA


def group_fisher_means(name: str, m: MultiLoRALinear) -> dict[str, torch.Tensor]:
    """The module's accumulated Fisher sums divided by its example count, split per group parameter."""
    count = m.fisher_count.clamp_min(1.0).float()
    out = {}
    for g in range(m.num_groups):
        rows = slice(g * m.rank, (g + 1) * m.rank)
        out[f"{name}.lora_A_groups.{g}"] = m.fisher_A[rows] / count
        out[f"{name}.lora_B_groups.{g}"] = m.fisher_B[:, rows] / count
    return out


def ewc_penalty(params: list[torch.Tensor], fishers: list[torch.Tensor], anchors: list[torch.Tensor],
                lam: float) -> torch.Tensor:
    """(lam / 2) * sum_i F_i * (theta_i - theta*_i)^2, in fp32, differentiable in ``params``."""
    total = sum((f * (p.float() - a).square()).sum() for p, f, a in zip(params, fishers, anchors))
    return 0.5 * lam * total


class EWC(SequentialLoRA):
    name = "ewc"
    config_fields = ("ewc_lambda", "ewc_samples", "ewc_online")

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        if cfg.ewc_lambda < 0:
            raise ValueError(f"method.ewc_lambda must be >= 0, got {cfg.ewc_lambda}")
        if cfg.ewc_samples < 1:
            raise ValueError(f"method.ewc_samples must be >= 1 (examples for the Fisher), got {cfg.ewc_samples}")
        self.named = list(lora_group_params(model))
        # Empty until the first task ends: no penalty on task 1.
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def loss_penalty(self) -> torch.Tensor | None:
        if not self.fisher:
            return None
        return ewc_penalty([p for _, p in self.named], [self.fisher[n] for n, _ in self.named],
                           [self.anchor[n] for n, _ in self.named], self.cfg.ewc_lambda)

    def on_task_end_data(self, batches: BatchSource, loss_of: LossOf) -> None:
        params = [p for _, p in self.named]
        device = self.modules[0].fisher_A.device
        for m in self.modules:
            m.reset_fisher()
            m.track_fisher = True
        try:
            for batch in batches(self.cfg.ewc_samples):
                size = batch["input_ids"].shape[0]
                # loss_of is the mean of the per-example losses: example n's own gradient is size x its share.
                set_example_scale(self.model, torch.full((size,), float(size), device=device))
                # The gradients themselves are not needed: the LoRA backward accumulates the Fisher on the way.
                torch.autograd.grad(loss_of(batch), params, allow_unused=True)
        finally:
            set_example_scale(self.model, None)
            for m in self.modules:
                m.track_fisher = False
        all_reduce_fisher_(self.modules)
        with torch.no_grad():
            new = {}
            for name, m in iter_multi_lora(self.model):
                new.update(group_fisher_means(name, m))  # fresh tensors: the buffers are reset next
                m.reset_fisher()
            if self.cfg.ewc_online and self.fisher:
                for k, f in new.items():
                    f.add_(self.fisher[k])
            self.fisher = new
            self.anchor = {n: p.detach().float().clone() for n, p in self.named}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"fisher.{n}": t for n, t in self.fisher.items()}
        state.update({f"anchor.{n}": t for n, t in self.anchor.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.fisher, self.anchor = {}, {}
            return
        expected = {f"{kind}.{n}" for kind in ("fisher", "anchor") for n, _ in self.named}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"EWC state does not match this model's LoRA parameters: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]} (was the checkpoint written by another method/config?)")
        self.fisher = {n: state[f"fisher.{n}"].to(p.device, torch.float32).clone() for n, p in self.named}
        self.anchor = {n: state[f"anchor.{n}"].to(p.device, torch.float32).clone() for n, p in self.named}
