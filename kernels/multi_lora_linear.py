"""Fused stacked multi-group LoRA linear with per-example Fisher (Triton).

    y = x W^T + b + s * (drop(x) A^T) B^T,   A: (R, d_in), B: (d_out, R)

Same contract as the eager reference (docs/DESIGN.md, "LoRA"; kernel design in docs/KERNELS.md).
Where the work goes:

- forward: one Triton pass over x for h = drop(x) A^T that also draws the dropout mask (the only
  draw) and stores it as bits; one Triton pass writing y = b + s h B^T; cuBLAS adds x W^T into y with
  beta = 1. Saved for backward: x, h (float32, N x R), the bit mask (N x d_in / 8 bytes).
- backward: a Triton pass for g = dy B; a Triton pass writing dx = s (g A) * mask; cuBLAS adds dy W
  into dx with beta = 1; for the rows in ``grad_rows`` only, one Triton pass over dy (for B) and one over x with
  the stored mask (for A) that cut the token contraction at example boundaries and produce both
  sum_n G_n (the gradient) and sum_n (c_n G_n)^2 (the Fisher) in float32.

Examples are the batch rows of a 3-D x, the tokens of a 2-D x, or, with ``cu_seqlens`` (int32, B + 1,
as FlashAttention's varlen API), the segments cu_seqlens[n] .. cu_seqlens[n+1] - 1 of the flattened
tokens of a packed batch.

The inputs may be float32, float16 or bfloat16 (A and B may differ from x, e.g. float32 adapters on
a bf16 model); W and b must match x. Kernels run on CUDA, or on CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before triton is first imported).
"""
from __future__ import annotations

import torch

from kernels.lora_triton import keep_mask, lora_down, lora_up_, per_example_grads
from kernels.varlen import check_cu_seqlens

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dropout_keep_mask(num_rows: int, width: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Bool (num_rows, width): which elements of a (num_rows, width) input the fused path keeps for ``seed``.

    Lets a reference reproduce the fused path's dropout exactly (x2d * mask / (1 - p)).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return keep_mask(num_rows, width, p, int(seed), torch.device(device))


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_rows, fisher_A, fisher_B,
                  example_scale, cu_seqlens) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"multi_lora_linear_triton: {msg}")

    if x.dim() not in (2, 3):
        fail(f"x must be (batch, seq, d_in) or (tokens, d_in), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        fail(f"weight must be (d_out, d_in={x.shape[-1]}), got {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if bias is not None and bias.shape != (d_out,):
        fail(f"bias must be (d_out={d_out},), got {tuple(bias.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != d_in:
        fail(f"lora_A must be (R, d_in={d_in}), got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if lora_B.shape != (d_out, rank):
        fail(f"lora_B must be (d_out, R) = ({d_out}, {rank}), got {tuple(lora_B.shape)}")
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"multi_lora_linear_triton: {name} must be float32/float16/bfloat16, got {t.dtype}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"multi_lora_linear_triton: weight/bias dtype must equal x dtype {x.dtype} "
                        f"(got {weight.dtype}/{None if bias is None else bias.dtype}); cast x to the layer's dtype")
    if not 0.0 <= dropout_p < 1.0:
        fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(seed, int):
        raise TypeError(f"multi_lora_linear_triton: seed must be a Python int, got {type(seed).__name__}")
    if grad_rows.dtype != torch.int64 or grad_rows.dim() != 1:
        fail(f"grad_rows must be a 1-D int64 tensor, got {grad_rows.dtype} of shape {tuple(grad_rows.shape)}")
    if (fisher_A is None) != (fisher_B is None):
        fail("pass both fisher_A and fisher_B, or neither")
    if fisher_A is not None:
        if fisher_A.dtype != torch.float32 or fisher_B.dtype != torch.float32:
            raise TypeError("multi_lora_linear_triton: Fisher accumulators must be float32")
        if fisher_A.shape != lora_A.shape or fisher_B.shape != lora_B.shape:
            fail(f"fisher_A/fisher_B must have the shapes of lora_A {tuple(lora_A.shape)} / lora_B "
                 f"{tuple(lora_B.shape)}, got {tuple(fisher_A.shape)} / {tuple(fisher_B.shape)}")
    num_examples = x.shape[0]
    if cu_seqlens is not None:
        num_examples = check_cu_seqlens(cu_seqlens, x.numel() // max(d_in, 1), "multi_lora_linear_triton")
    if example_scale is not None:
        if example_scale.shape != (num_examples,) or not example_scale.is_floating_point():
            fail(f"example_scale must be a float tensor with one entry per example ({num_examples}), "
                 f"got {example_scale.dtype} of shape {tuple(example_scale.shape)}")
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B, "grad_rows": grad_rows,
               "fisher_A": fisher_A, "fisher_B": fisher_B, "example_scale": example_scale, "cu_seqlens": cu_seqlens}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            fail(f"{name} is on {t.device} but x is on {x.device}; move all inputs to one device")
    if x.device.type == "cpu":
        # Value checks need the data on the host: free on CPU, a sync per call on CUDA, so only here.
        if grad_rows.numel() and (grad_rows.min() < 0 or grad_rows.max() >= rank
                                  or (grad_rows.diff() <= 0).any()):
            fail(f"grad_rows must be sorted, unique and in [0, {rank}), got {grad_rows.tolist()}")


class MultiLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_rows, fisher_A, fisher_B,
                example_scale, cu_seqlens):
        d_out, d_in = weight.shape
        x2 = x.reshape(-1, d_in)
        if x2.shape[1] > 1 and x2.stride(1) != 1:
            x2 = x2.contiguous()
        h, mask = lora_down(x2, lora_A, dropout_p, seed)  # h includes the 1 / (1 - p) of dropout
        # The LoRA term (and bias) is written first and the base GEMM adds into it with beta = 1: y is
        # written once by Triton and read once inside the GEMM's epilogue, instead of a second pass that
        # reads and rewrites it.
        y2 = torch.empty(x2.shape[0], d_out, dtype=x2.dtype, device=x2.device)
        lora_up_(y2, h, lora_B, scaling, bias=bias, accumulate=False)
        y2.addmm_(x2, weight.t())
        ctx.save_for_backward(x2, h, mask, weight, lora_A, lora_B, grad_rows, example_scale, cu_seqlens)
        # Accumulators are written by backward; kept off saved_tensors so the version counter check
        # does not trip when one module runs twice before its backward.
        ctx.fisher_A, ctx.fisher_B = fisher_A, fisher_B
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.x_shape = x.shape
        ctx.tokens_per_example = x.shape[1] if x.dim() == 3 else 1
        return y2.view(*x.shape[:-1], d_out)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2, h, mask, weight, lora_A, lora_B, grad_rows, c, cu_seqlens = ctx.saved_tensors
        fisher_A, fisher_B = ctx.fisher_A, ctx.fisher_B
        s, p = ctx.scaling, ctx.dropout_p
        d_out, d_in = weight.shape
        dy2 = dy.reshape(-1, d_out)
        if dy2.dtype != x2.dtype:
            dy2 = dy2.to(x2.dtype)
        if dy2.shape[1] > 1 and dy2.stride(1) != 1:
            dy2 = dy2.contiguous()
        wants_x, wants_A, wants_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        with_fisher = fisher_A is not None
        weight_work = (wants_A or wants_B or with_fisher) and grad_rows.numel() > 0
        g = lora_down(dy2, lora_B.t())[0] if (wants_x or weight_work) else None  # (N, R) = dy B
        # x's side of the LoRA product saw keep * x / (1 - p): the 1 / (1 - p) goes into the scale.
        s_x = s / (1.0 - p)

        dx = None
        if wants_x:
            dx = torch.empty(dy2.shape[0], d_in, dtype=dy2.dtype, device=dy2.device)
            lora_up_(dx, g, lora_A.t(), s_x, mask, accumulate=False)  # then dx += dy W with beta = 1
            dx = dx.addmm_(dy2, weight).view(ctx.x_shape)

        dA = torch.zeros_like(lora_A) if wants_A else None
        dB = torch.zeros_like(lora_B) if wants_B else None
        if weight_work:
            t = ctx.tokens_per_example
            if wants_B or with_fisher:
                gB, fB = per_example_grads(dy2, h, grad_rows, c, t, s, with_fisher, cu_seqlens=cu_seqlens)
                if wants_B:
                    dB[:, grad_rows] = gB.to(dB.dtype)
                if with_fisher:
                    fisher_B.index_add_(1, grad_rows, fB)
            if wants_A or with_fisher:
                gA, fA = per_example_grads(x2, g, grad_rows, c, t, s_x, with_fisher, mask=mask,
                                           cu_seqlens=cu_seqlens)
                if wants_A:
                    dA[grad_rows] = gA.t().to(dA.dtype)
                if with_fisher:
                    fisher_A.index_add_(0, grad_rows, fA.t())
        return dx, None, None, dA, dB, None, None, None, None, None, None, None, None


def multi_lora_linear_triton(
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
    """Fused stacked LoRA linear with per-example Fisher (contract: docs/DESIGN.md, "LoRA")."""
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, grad_rows, fisher_A, fisher_B,
                  example_scale, cu_seqlens)
    return MultiLoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed,
                                         grad_rows, fisher_A, fisher_B, example_scale, cu_seqlens)
