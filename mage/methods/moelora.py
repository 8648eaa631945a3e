"""MoELoRA as the CoIN benchmark runs it (Chen et al., "CoIN: A Benchmark of Continual Instruction tuNing
for Multimodel Large Language Model", 2024; docs/METHOD.md section 5).

The four rank-r LoRA groups are E = 4 experts. Per adapted linear a router W_r (d_in -> E, no bias, the
default nn.Linear init, trainable) reads the layer input x; per token g(x) = softmax(W_r x), dense (no
top-k, no auxiliary loss), and h = W0 x + sum_i g_i(x) * s * B_i A_i drop(x), s = alpha / (E r). Nothing is
task-specific: every expert and the router train on every task.

The gate enters ``MultiLoRALinear.group_gate``; that path is eager (the fused Triton kernels take no
per-token gate and the layer warns once when it falls back) and computes no per-example Fisher.
"""
from __future__ import annotations

import torch
from torch import nn

from mage.lora import iter_multi_lora
from mage.methods.base import copy_state_
from mage.methods.finetune import SequentialLoRA


class SoftmaxRouter(nn.Module):
    """x (..., d_in) -> softmax(W_r x) (..., E); the softmax in float32, returned in x's dtype."""

    def __init__(self, d_in: int, num_experts: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(d_in, num_experts, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(x).float(), dim=-1).to(x.dtype)


class MoELoRA(SequentialLoRA):
    name = "moelora"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.routers: list[tuple[str, SoftmaxRouter]] = []
        for name, m in iter_multi_lora(model):
            if m.group_gate is not None:
                raise ValueError(f"{name} already has a group gate: build MoELoRA on a freshly wrapped model")
            w = m.lora_A_groups[0]
            m.group_gate = SoftmaxRouter(m.in_features, m.num_groups, device=w.device, dtype=w.dtype)
            self.routers.append((name, m.group_gate))

    def router_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"{name}.group_gate.proj.weight", r.proj.weight) for name, r in self.routers]

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return super().trainable_named_parameters() + self.router_parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"router.{n}": p for n, p in self.router_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        targets = {f"router.{n}": p for n, p in self.router_parameters()}
        copy_state_(targets, state, "MoELoRA state does not match this model's routers")
