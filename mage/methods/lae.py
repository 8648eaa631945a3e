"""LAE (Gao et al., "A Unified Continual Learning Framework with General Parameter-Efficient Tuning",
ICCV 2023; docs/METHOD.md section 5) on the rank-(G r) LoRA baseline.

The online model trains as ``lora`` does. From the start of task 2 an offline copy (float32) of every
tensor the method trains (all LoRA groups and the non-LoRA trainables, which SEED-X also tunes) follows it
after each optimizer step: θ_off = m θ_off + (1 - m) θ_on, ``method.lae_momentum`` = m (the paper's 0.99;
the LAE reference uses 0.9999). The copy starts as the weights task 1 ended with and is never reset.

Inference (``generator()``, used by the evaluation): text tokens by the element-wise max of the online and
offline next-token distributions at every decoding step (two models, two KV caches); image outputs by the
mean of the two models' output-image features (``mage.methods.lae_decoding``). Before task 2 there is no
offline copy and the online model decodes alone.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mage.methods.base import lora_group_params
from mage.methods.finetune import SequentialLoRA
from mage.methods.lae_decoding import MaxOfTwoDecoder


class LAE(SequentialLoRA):
    name = "lae"
    config_fields = ("lae_momentum",)

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        if not 0 <= cfg.lae_momentum < 1:
            raise ValueError(f"method.lae_momentum must be in [0, 1), got {cfg.lae_momentum}")
        self.named = list(lora_group_params(model)) + list(self.extras)
        self.offline: dict[str, torch.Tensor] = {}
        self.tasks_done = torch.zeros((), dtype=torch.int64)  # on the CPU: read once per task

    def on_task_start(self, task_groups: Sequence[int]) -> None:
        super().on_task_start(task_groups)
        if int(self.tasks_done) >= 1 and not self.offline:
            self.offline = {n: p.detach().float().clone() for n, p in self.named}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if not self.offline:
            return
        weight = 1.0 - self.cfg.lae_momentum
        for n, p in self.named:
            self.offline[n].lerp_(p.detach().float(), weight)

    def on_task_end(self) -> None:
        self.tasks_done += 1

    def generator(self):
        if not self.offline:
            return None
        return MaxOfTwoDecoder(self.model, [p for _, p in self.named], [self.offline[n] for n, _ in self.named])

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"tasks_done": self.tasks_done}
        state.update({f"offline.{n}": t for n, t in self.offline.items()})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "tasks_done" not in state:
            raise ValueError(f"LAE state lacks tasks_done (keys {sorted(state)[:3]}...): another method?")
        names = {f"offline.{n}" for n, _ in self.named}
        keys = set(state) - {"tasks_done"}
        if keys and keys != names:
            raise ValueError(f"LAE state does not match this model: missing {sorted(names - keys)[:3]}, unexpected "
                             f"{sorted(keys - names)[:3]} (was the checkpoint written by another method/config?)")
        self.tasks_done.copy_(state["tasks_done"])
        self.offline = {n: state[f"offline.{n}"].to(p.device, torch.float32).clone() for n, p in self.named} \
            if keys else {}
