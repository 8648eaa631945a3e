"""PGP on the LoRA baseline: gradient projection of the LoRA A matrices (docs/METHOD.md section 5), following
Qiao et al., "Prompt Gradient Projection for Continual Learning" (ICLR 2024) with GPM's bases
(Saha et al., "Gradient Projection Memory for Continual Learning", ICLR 2021).

Per adapted linear, an orthonormal basis U (d_in x k) of the input activations of earlier tasks, grown
after each task by GPM's energy rule (Saha et al., 2021) from activation rows of ``pgp_samples``
examples. While training later tasks, every step projects the gradient dA <- dA - dA U Uᵀ and then the
update itself: AdamW's elementwise normalisation and its weight decay would otherwise move A inside
span U (an elementwise rescaling of a projected gradient is no longer orthogonal to U), so after the
optimizer step A <- A_before + ΔA - ΔA U Uᵀ with ΔA = A - A_before. A x for x in span U is then exactly
what it was when the task started; B is not projected.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mage.lora import iter_multi_lora
from mage.methods.base import BatchSource, GradGetter, LossOf
from mage.methods.finetune import SequentialLoRA


@torch.no_grad()
def grow_basis(basis: torch.Tensor, rows: torch.Tensor, threshold: float, max_dim: int) -> torch.Tensor:
    """GPM: extend the orthonormal ``basis`` (d, k) by the fewest leading directions of the rows' residual
    (rows (m, d), after projecting out the basis) such that the basis holds at least ``threshold`` of the
    rows' energy sum ||x||²; never beyond ``max_dim`` columns or the residual's numerical rank."""
    r = rows.float().T
    total = r.square().sum().double()
    resid = r - basis @ (basis.T @ r)
    captured = total - resid.square().sum().double()
    room = max_dim - basis.shape[1]
    if total <= 0 or room <= 0 or captured >= threshold * total:
        return basis
    u, s, _ = torch.linalg.svd(resid, full_matrices=False)
    energy = captured + torch.cumsum(s.double().square(), 0)
    need = int((energy < threshold * total).sum()) + 1  # the smallest k reaching the threshold
    rank = int((s > s[0] * max(resid.shape) * torch.finfo(s.dtype).eps).sum())
    k = min(need, room, rank)
    if k <= 0:
        return basis
    # QR keeps the columns orthonormal to working precision as the basis grows task after task.
    q, _ = torch.linalg.qr(torch.cat([basis, u[:, :k]], dim=1))
    return q


def project_out_(grad: torch.Tensor, basis: torch.Tensor) -> None:
    """grad (r, d) <- grad - grad U Uᵀ, in place."""
    grad.sub_(((grad.float() @ basis) @ basis.T).to(grad.dtype))


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, so that all ranks grow the same basis. Zero rows pad ranks with fewer rows:
    they carry no energy and no direction."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    padded = rows.new_zeros(int(count), rows.shape[1])
    padded[: rows.shape[0]] = rows
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(out, padded)
    return torch.cat(out)


class PGP(SequentialLoRA):
    name = "pgp"
    config_fields = ("pgp_samples", "pgp_tokens_per_example", "pgp_threshold", "pgp_max_basis")

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        if not 0 < cfg.pgp_threshold <= 1:
            raise ValueError(f"method.pgp_threshold must be in (0, 1], got {cfg.pgp_threshold}")
        if not 0 <= cfg.pgp_max_basis <= 1:
            raise ValueError(f"method.pgp_max_basis is a fraction of the input width, in [0, 1]; "
                             f"got {cfg.pgp_max_basis}")
        if cfg.pgp_samples < 1 or cfg.pgp_tokens_per_example < 1:
            raise ValueError("method.pgp_samples and method.pgp_tokens_per_example must be >= 1")
        self.lora_layers = list(iter_multi_lora(model))
        self.bases = {name: m.lora_A_groups[0].new_zeros(m.in_features, 0, dtype=torch.float32)
                      for name, m in self.lora_layers}
        self.tasks_seen = 0  # seeds the token sampling; restored from the bases' state
        self._before: dict[int, torch.Tensor] = {}  # id(A group) -> its value before this optimizer step

    def before_clip(self, grad_of: GradGetter) -> None:
        for name, m in self.lora_layers:
            basis = self.bases[name]
            if basis.shape[1] == 0:
                continue
            for p in m.lora_A_groups:
                if p.requires_grad:
                    before = self._before.get(id(p))
                    if before is None:
                        self._before[id(p)] = p.detach().clone()
                    else:
                        before.copy_(p.detach())
                g = grad_of(p)
                if g is None:
                    continue
                if g is not p.grad:
                    raise RuntimeError("PGP projects the gradients in place, but the engine handed a copy "
                                       "(DeepSpeed ZeRO partitions them): use train.engine=ddp with method.name=pgp")
                project_out_(g, basis)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for name, m in self.lora_layers:
            basis = self.bases[name]
            if basis.shape[1] == 0:
                continue
            for p in m.lora_A_groups:
                before = self._before.get(id(p))
                if before is not None and p.requires_grad:
                    # p <- p - (ΔA U) Uᵀ: removes the part of the whole update (Adam scaling, decay) in span U.
                    p.sub_((((p.float() - before.float()) @ basis) @ basis.T).to(p.dtype))

    def on_task_end(self) -> None:
        self._before = {}

    @torch.no_grad()
    def on_task_end_data(self, batches: BatchSource, loss_of: LossOf) -> None:
        rows: dict[str, list[torch.Tensor]] = {name: [] for name, _ in self.lora_layers}
        pick: dict = {}  # this batch's (B, T) and the sampled (example, position) pairs, on the device
        gen = torch.Generator().manual_seed(self.tasks_seen)

        def record(name):
            def hook(module, args):
                x = args[0]
                if tuple(x.shape[:-1]) != pick["shape"]:
                    raise RuntimeError(f"PGP expects {name}'s input as (batch, seq, d) matching the batch's "
                                       f"attention_mask {pick['shape']}, got {tuple(x.shape)}")
                rows[name].append(x[pick["b"], pick["t"]])
            return hook

        handles = [m.register_forward_pre_hook(record(name)) for name, m in self.lora_layers]
        try:
            for batch in batches(self.cfg.pgp_samples):
                mask = batch["attention_mask"]
                b, t = self._sample_tokens(mask, gen)
                pick.update(shape=tuple(mask.shape), b=b.to(mask.device), t=t.to(mask.device))
                loss_of(batch)
        finally:
            for h in handles:
                h.remove()
        for name, m in self.lora_layers:
            if not rows[name]:
                continue
            gathered = _gather_rows(torch.cat(rows[name]))
            max_dim = int(self.cfg.pgp_max_basis * m.in_features)
            self.bases[name] = grow_basis(self.bases[name], gathered, self.cfg.pgp_threshold, max_dim)
        self.tasks_seen += 1

    def _sample_tokens(self, attention_mask: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(example, position) index pairs: up to pgp_tokens_per_example random valid tokens per example."""
        mask = attention_mask.detach().cpu().bool()  # once per batch of the task-end pass
        bs, ts = [], []
        for i in range(mask.shape[0]):
            valid = mask[i].nonzero().flatten()
            chosen = valid[torch.randperm(valid.numel(), generator=gen)[: self.cfg.pgp_tokens_per_example]]
            bs.append(torch.full_like(chosen, i))
            ts.append(chosen)
        return torch.cat(bs), torch.cat(ts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"basis.{n}": b for n, b in self.bases.items() if b.shape[1]}
        state["tasks_seen"] = torch.tensor(self.tasks_seen)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unknown = sorted(k for k in state if k != "tasks_seen" and k[len("basis."):] not in self.bases)
        if "tasks_seen" not in state or unknown:
            raise ValueError(f"PGP state does not match this model: unknown {unknown[:3]}, tasks_seen "
                             f"{'present' if 'tasks_seen' in state else 'missing'} (another method/config?)")
        self.tasks_seen = int(state["tasks_seen"])
        for name, old in self.bases.items():
            b = state.get(f"basis.{name}")
            if b is None:
                self.bases[name] = old.new_zeros(old.shape[0], 0)
            elif b.shape[0] != old.shape[0]:
                raise ValueError(f"PGP basis of {name} has {b.shape[0]} rows but the layer's input width is "
                                 f"{old.shape[0]}")
            else:
                self.bases[name] = b.to(old.device, torch.float32).clone()
