"""RegLoRA, the regularised-LoRA half of SEFE (Chen et al., "SEFE: Superficial and Essential Forgetting
Eliminator for Multimodal Continual Instruction Tuning", ICML 2025; docs/METHOD.md section 5).

At the end of every task, per adapted linear: the top ``reglora_top_fraction`` (2%) entries of |B A| (the
task's whole rank-(G r) LoRA) become key positions S (accumulated over tasks, stored as sorted flat int32
indices i * d_in + j); s B A is merged into the base weight; A starts afresh (N(0, 0.01^2)) and B at 0.
While training later tasks the loss gains

    lambda * mean over layers of mean_{(i, j) in S} |(B A)_ij|,   (B A)_ij = B[i, :] . A[:, j]

computed by gathering rows of B and columns of A in chunks (never the d_out x d_in product; backward
recomputes the chunks instead of saving them).

Checkpoints: the merged base-weight changes are held as each task's (B_t, A_t) factors, replayed in order
on the freshly built base weights when a run resumes, with the same arithmetic as the live merge, so the
resumed base weights are bit-identical.
"""
from __future__ import annotations

import math

import torch

from mage.lora import MultiLoRALinear, iter_multi_lora
from mage.methods.finetune import SequentialLoRA

CHUNK = 1 << 16  # key positions per gather: bounds the (chunk, rank) temporaries


def _rows_cols(flat: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = flat.long()
    return flat // d_in, flat % d_in


def _gathered(B: torch.Tensor, A: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B A)_ij at the given (i, j) pairs, float32: sum_r B[i, r] A[r, j]."""
    return (B[rows].float() * A[:, cols].T.float()).sum(1)


class GatheredAbsMean(torch.autograd.Function):
    """mean_{k} |(B A)_{i_k j_k}| over flat positions i * d_in + j, without forming B A."""

    @staticmethod
    def forward(ctx, B, A, flat):
        d_in = A.shape[1]
        total = torch.zeros((), dtype=torch.float32, device=B.device)
        for start in range(0, flat.numel(), CHUNK):
            rows, cols = _rows_cols(flat[start:start + CHUNK], d_in)
            total += _gathered(B, A, rows, cols).abs().sum()
        ctx.save_for_backward(B, A, flat)
        return total / max(flat.numel(), 1)

    @staticmethod
    def backward(ctx, grad):
        B, A, flat = ctx.saved_tensors
        d_in = A.shape[1]
        dB = torch.zeros(B.shape, dtype=torch.float32, device=B.device)
        dA = torch.zeros(A.shape, dtype=torch.float32, device=A.device)
        scale = grad.float() / max(flat.numel(), 1)
        for start in range(0, flat.numel(), CHUNK):
            rows, cols = _rows_cols(flat[start:start + CHUNK], d_in)
            w = torch.sign(_gathered(B, A, rows, cols)) * scale  # d|v|/dv, 0 at 0
            dB.index_add_(0, rows, w[:, None] * A[:, cols].T.float())
            dA.index_add_(1, cols, (w[:, None] * B[rows].float()).T)
        return dB.to(B.dtype), dA.to(A.dtype), None


def gathered_abs_mean(B: torch.Tensor, A: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return GatheredAbsMean.apply(B, A, flat)


def top_positions(B: torch.Tensor, A: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat indices (int32, sorted) of the ceil(fraction * numel) largest |B A| entries (materialised once,
    at a task end)."""
    delta = (B.float() @ A.float()).abs().flatten()
    k = max(1, math.ceil(fraction * delta.numel()))
    return torch.topk(delta, k, sorted=False).indices.sort().values.to(torch.int32)


@torch.no_grad()
def merge_into_base_(m: MultiLoRALinear, B: torch.Tensor, A: torch.Tensor) -> None:
    """W <- W + s B A, in float32 then cast: the one arithmetic used live and when a resume replays it."""
    w = m.base.weight
    w.add_((m.scaling * (B.float() @ A.float())).to(w.dtype))


class RegLoRA(SequentialLoRA):
    name = "reglora"
    config_fields = ("reglora_lambda", "reglora_top_fraction")

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        if cfg.reglora_lambda < 0:
            raise ValueError(f"method.reglora_lambda must be >= 0, got {cfg.reglora_lambda}")
        if not 0 < cfg.reglora_top_fraction <= 1:
            raise ValueError(f"method.reglora_top_fraction must be in (0, 1], got {cfg.reglora_top_fraction}")
        self.layers = list(iter_multi_lora(model))
        for name, m in self.layers:
            if m.out_features * m.in_features > torch.iinfo(torch.int32).max:
                raise ValueError(f"{name}: {m.out_features} x {m.in_features} positions do not fit int32 indices")
        self.positions: dict[str, torch.Tensor] = {}
        # Per finished task, per layer, the merged factors (B_t, A_t): what the base weights now hold.
        self.merged: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def loss_penalty(self) -> torch.Tensor | None:
        if not self.positions:
            return None
        terms = [gathered_abs_mean(m.lora_B, m.lora_A, self.positions[name]) for name, m in self.layers]
        return self.cfg.reglora_lambda * torch.stack(terms).mean()

    @torch.no_grad()
    def on_task_end(self) -> None:
        task = len(self.merged)
        gen = torch.Generator().manual_seed(7919 + task)  # fresh A: own stream, the training RNG is untouched
        factors = {}
        for name, m in self.layers:
            B, A = m.lora_B.detach().clone(), m.lora_A.detach().clone()
            new = top_positions(B, A, self.cfg.reglora_top_fraction).to(m.fisher_A.device)
            old = self.positions.get(name)
            self.positions[name] = new if old is None else torch.unique(torch.cat([old, new]))  # sorted union
            merge_into_base_(m, B, A)
            factors[name] = (B, A)
            for a, b in zip(m.lora_A_groups, m.lora_B_groups):
                a.copy_(torch.randn(a.shape, generator=gen) * 0.01)
                b.zero_()
        self.merged.append(factors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"tasks_merged": torch.tensor(len(self.merged))}
        state.update({f"positions.{n}": p for n, p in self.positions.items()})
        for t, factors in enumerate(self.merged):
            for n, (B, A) in factors.items():
                state[f"merged.{t}.B.{n}"] = B
                state[f"merged.{t}.A.{n}"] = A
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replays the checkpoint's merges on this model's base weights; only on a model that has none yet."""
        if "tasks_merged" not in state:
            raise ValueError(f"RegLoRA state lacks tasks_merged (keys {sorted(state)[:3]}...): another method?")
        if self.merged:
            raise ValueError("RegLoRA state can only be loaded into a model whose base weights hold no merges yet")
        tasks = int(state["tasks_merged"])
        expected = {f"merged.{t}.{k}.{n}" for t in range(tasks) for k in "BA" for n, _ in self.layers}
        if tasks:
            expected |= {f"positions.{n}" for n, _ in self.layers}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected - {"tasks_merged"})
        if missing or unexpected:
            raise ValueError(f"RegLoRA state does not match this model: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]} (was the checkpoint written by another method/config?)")
        for t in range(tasks):
            factors = {}
            for name, m in self.layers:
                w = m.lora_A_groups[0]
                B = state[f"merged.{t}.B.{name}"].to(w.device, w.dtype).clone()
                A = state[f"merged.{t}.A.{name}"].to(w.device, w.dtype).clone()
                merge_into_base_(m, B, A)
                factors[name] = (B, A)
            self.merged.append(factors)
        self.positions = {n: state[f"positions.{n}"].to(m.fisher_A.device, torch.int32).clone()
                          for n, m in self.layers if tasks}
