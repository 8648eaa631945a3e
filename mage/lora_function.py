"""Eager reference of the stacked multi-group LoRA linear with per-example Fisher.

    y = x W^T + b + s * (drop(x) A^T) B^T,   A: (R, d_in), B: (d_out, R)

Backward returns the batch gradient of A and B at ``grad_rows`` only (zeros elsewhere) and, when
Fisher buffers are given, adds sum_n (c_n G_n)^2 to them, G_n being example n's own gradient. Both come
from one batched contraction cut at example boundaries (einsum over tokens, batch dim kept): no loop
over examples and no second backward. Examples are the rows of a 3-D x, the tokens of a 2-D x, or,
given ``cu_seqlens`` (int32, B + 1, as FlashAttention varlen), the segments of a packed batch's
flattened tokens (scattered into a zero-padded (B, longest, d) view for the einsum). The fused Triton path in ``kernels.multi_lora_linear`` has the
same signature and is tested against this one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.varlen import check_cu_seqlens


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The scaled keep-mask (0 or 1/(1-p)) of the eager path, reproducible from ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


def packed_to_padded(t: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Tokens (..., d) of a packed batch -> (B, longest, d), zero where an example is shorter."""
    t2 = t.reshape(-1, t.shape[-1])
    lengths = cu_seqlens.diff().long()
    # .item(): the padded length is a shape; one host read per call of this reference path.
    longest = int(lengths.max().item()) if lengths.numel() else 0
    example = torch.repeat_interleave(torch.arange(lengths.numel(), device=t.device), lengths)
    position = torch.arange(t2.shape[0], device=t.device) - cu_seqlens.long()[example]
    padded = t2.new_zeros(lengths.numel(), longest, t2.shape[-1])
    padded[example, position] = t2
    return padded


def as_examples(t: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, d) stays; (N, d) becomes (N, 1, d): N one-token examples; with cu_seqlens the packed
    tokens become (B, longest, d)."""
    if cu_seqlens is not None:
        return packed_to_padded(t, cu_seqlens)
    if t.dim() == 3:
        return t
    if t.dim() == 2:
        return t.unsqueeze(1)
    raise ValueError(f"multi_lora_linear expects x of shape (batch, seq, d) or (tokens, d), got {tuple(t.shape)}")


class MultiLoRALinearEager(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_rows, fisher_A, fisher_B,
                example_scale, cu_seqlens):
        # The mask is kept for backward rather than drawn again: on CPU the draw costs more than the matmuls.
        keep = dropout_mask(x.shape, dropout_p, seed, x.device, x.dtype) if dropout_p > 0 else None
        x_lora = x * keep if keep is not None else x
        h = x_lora @ lora_A.t()
        y = F.linear(x, weight, bias) + scaling * (h @ lora_B.t())
        ctx.save_for_backward(x_lora, h, weight, lora_A, lora_B, grad_rows, example_scale, cu_seqlens, keep)
        # Accumulators are written by backward, so they ride on ctx rather than in saved tensors (whose
        # version check would fail when one module runs twice before its backward).
        ctx.fisher_A, ctx.fisher_B = fisher_A, fisher_B
        ctx.scaling = scaling
        ctx.dropout_p, ctx.seed = dropout_p, seed
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x_lora, h, weight, lora_A, lora_B, grad_rows, c, cu, keep = ctx.saved_tensors
        fisher_A, fisher_B = ctx.fisher_A, ctx.fisher_B
        s = ctx.scaling
        dh = dy @ lora_B  # (..., R): gradient w.r.t. h / s
        dx = None
        if ctx.needs_input_grad[0]:
            dx_lora = s * (dh @ lora_A)
            if keep is not None:
                dx_lora = dx_lora * keep
            dx = dy @ weight + dx_lora
        wants_A, wants_B = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dA = torch.zeros_like(lora_A) if wants_A else None
        dB = torch.zeros_like(lora_B) if wants_B else None
        if (wants_A or wants_B) and grad_rows.numel() > 0:
            acc = torch.promote_types(dy.dtype, torch.float32)  # gradients in at least float32
            if fisher_A is None:
                # No Fisher: the batch gradient sum_n G_n is one matmul over all tokens.
                def flat(t: torch.Tensor) -> torch.Tensor:
                    return t.reshape(-1, t.shape[-1]).to(acc)

                gA = s * (flat(dh)[:, grad_rows].t() @ flat(x_lora)) if wants_A else None
                gB = s * (flat(dy).t() @ flat(h)[:, grad_rows]) if wants_B else None
            else:
                # Per-example gradients G_B,n = s sum_t dy_t h_t^T, G_A,n = s sum_t dh_t x_t^T, for the Fisher.
                dy3 = as_examples(dy, cu).to(acc)
                h3 = as_examples(h, cu).to(acc)[..., grad_rows]
                dh3 = as_examples(dh, cu).to(acc)[..., grad_rows]
                x3 = as_examples(x_lora, cu).to(acc)
                gB_n = s * torch.einsum("bto,btr->bor", dy3, h3)
                gA_n = s * torch.einsum("btr,bti->bri", dh3, x3)
                c2 = torch.ones(gA_n.shape[0], device=dy.device, dtype=acc) if c is None else c.to(acc).square()
                fisher_A.index_add_(0, grad_rows, torch.einsum("b,bri->ri", c2, gA_n.square()).float())
                fisher_B.index_add_(1, grad_rows, torch.einsum("b,bor->or", c2, gB_n.square()).float())
                gA, gB = gA_n.sum(0), gB_n.sum(0)
            if wants_A:
                dA[grad_rows] = gA.to(lora_A.dtype)
            if wants_B:
                dB[:, grad_rows] = gB.to(lora_B.dtype)
        return dx, None, None, dA, dB, None, None, None, None, None, None, None, None


def multi_lora_linear_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    grad_rows: torch.Tensor,
    fisher_A: torch.Tensor | None,
    fisher_B: torch.Tensor | None,
    example_scale: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stacked LoRA linear with per-example Fisher (see the module docstring for the contract)."""
    if (fisher_A is None) != (fisher_B is None):
        raise ValueError("pass both fisher_A and fisher_B, or neither")
    if fisher_A is not None and (fisher_A.dtype != torch.float32 or fisher_B.dtype != torch.float32):
        raise TypeError("Fisher accumulators must be float32")
    num_examples = x.shape[0] if x.dim() in (2, 3) else 0
    if cu_seqlens is not None:
        num_examples = check_cu_seqlens(cu_seqlens, x.numel() // max(x.shape[-1], 1), "multi_lora_linear_eager")
    else:
        as_examples(x)  # rejects other ranks with a clear message
    if example_scale is not None and example_scale.shape != (num_examples,):
        raise ValueError(f"example_scale must have one entry per example ({num_examples}), "
                         f"got shape {tuple(example_scale.shape)}")
    return MultiLoRALinearEager.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_rows,
                                      fisher_A, fisher_B, example_scale, cu_seqlens)
