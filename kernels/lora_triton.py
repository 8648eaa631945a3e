"""Triton kernels (and their launchers) behind ``kernels.multi_lora_linear``.

Notation: tokens n (N rows), a wide side of width D (d_in or d_out) and a narrow LoRA rank side R.

Dots: on GPU a 16-bit input is dotted in its own dtype (the tensor cores' native bf16/fp16 MMA, float32
accumulation); a float32 operand meeting a 16-bit one (float32 adapters, the float32 h and g) is cast to
the 16-bit dtype first. Under the Triton interpreter every operand is upcast to float32 instead, because
the interpreter computes bf16 dots wrongly. float32 inputs are dotted at float32 accuracy ("tf32x3").

Dropout: element (n, k) of x is kept when its Philox draw for ``seed`` (see ``_dropout_keep``) is >= p.
The forward pass draws it once and stores it as a bit mask (uint8, (N, ceil(K / 8)), bit j of byte b =
column 8 b + j); backward reads the bits instead of drawing again. The 1 / (1 - p) scale is uniform, so
it is applied to the float32 accumulators (or folded into the LoRA scale), never to 16-bit operands.
The draw depends only on (seed, n, k, K), never on block sizes, so any config gives the same mask.

Each launcher builds a ``Launch`` (kernel, grid, arguments, constexprs, config) before running it, so
``kernels.compile_check`` can compile exactly what the launchers would run, for any GPU target.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.lora_configs import pick

_MIN_DOT = 16
# triton.knobs exists from triton 3.4; older releases read the variable directly.
_knobs = getattr(triton, "knobs", None)
INTERPRETING = (bool(_knobs.runtime.interpret) if _knobs is not None
                else os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for kernel outputs (one place, so tests can poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def rank_block(r: int) -> int:
    """Power-of-two block covering ``r`` rank columns (at least the tl.dot minimum)."""
    return max(_MIN_DOT, triton.next_power_of_2(max(r, 1)))


def dot_mode(dtype: torch.dtype) -> dict:
    """NATIVE_DOT / DOT_PRECISION constexprs for a kernel whose wide operand has ``dtype``."""
    native = dtype in _SIXTEEN_BIT and not INTERPRETING
    # Upcast 16-bit values are exact in tf32. float32 inputs need float32 accuracy: tf32x3 (three tensor
    # core passes) gives it without the register cost of the FMA ("ieee") dot, which spilled.
    return dict(NATIVE_DOT=native, DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32")


def mask_bytes(width: int) -> int:
    return (width + 7) // 8


def unpack_keep_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Bool (N, width) from the packed keep mask (uint8, (N, ceil(width / 8)), bit j = column 8 b + j)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    unpacked = (bits.to(torch.int32)[..., None] >> shifts) & 1
    return unpacked.reshape(*bits.shape[:-1], -1)[..., :width].bool()


@dataclass
class Launch:
    """One kernel launch, described before it runs."""

    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int

    def __call__(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps,
                               num_stages=self.num_stages)


def _split_config(config: dict) -> tuple[dict, int, int]:
    config = dict(config)
    return config, config.pop("num_warps"), config.pop("num_stages")


@triton.jit
def _dropout_keep(seed, rows, col0, width, p, BLOCK_K: tl.constexpr):
    """Keep-mask of the block rows x [col0, col0 + BLOCK_K) of a row-major (*, width) input.

    One Philox call yields four numbers, so element (n, k) takes lane k % 4 of counter
    n * ceil(width / 4) + k // 4: a quarter of the RNG work of one call per element. col0 and BLOCK_K
    are multiples of 4, so the counters of a block never straddle its edge. Counters are int64 because
    N * K / 4 passes 2^31 at about 620k tokens of width 13824.
    """
    quads = col0 // 4 + tl.arange(0, BLOCK_K // 4).to(tl.int64)
    counters = rows.to(tl.int64)[:, None] * ((width + 3) // 4) + quads[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    lanes = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [..., i, j] holds lane 2 * i + j
    bits = tl.reshape(lanes, (rows.shape[0], BLOCK_K))
    return tl.random.uint_to_uniform_float(bits) >= p


@triton.jit
def _pack_bits(keep, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K) bool -> (BLOCK_N, BLOCK_K // 8) uint8, bit j of byte b = column 8 b + j."""
    grouped = tl.reshape(keep.to(tl.int32), (BLOCK_N, BLOCK_K // 8, 8))
    shifts = tl.arange(0, 8)
    return tl.sum(grouped << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _unpack_bits(packed, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Inverse of ``_pack_bits``."""
    shifts = tl.arange(0, 8)
    bits = (packed.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_N, BLOCK_K)) != 0


@triton.jit
def _keep_mask_kernel(mask_ptr, stride_mn, seed, p, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_K
    keep = _dropout_keep(seed, rows, col0.to(tl.int64), K, p, BLOCK_K)
    byte_cols = col0 // 8 + tl.arange(0, BLOCK_K // 8)
    inside = (rows < N)[:, None] & (byte_cols < (K + 7) // 8)[None, :]
    tl.store(mask_ptr + rows.to(tl.int64)[:, None] * stride_mn + byte_cols[None, :],
             _pack_bits(keep, BLOCK_N, BLOCK_K), mask=inside)


@triton.jit
def _lora_down_kernel(x_ptr, w_ptr, h_ptr, mask_ptr,
                      stride_xn, stride_wr, stride_wk, stride_hn, stride_mn,
                      seed, p, out_scale, N, K, R,
                      STORE_MASK: tl.constexpr, NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """h[n, r] = out_scale * sum_k keep[n, k] x[n, k] w[r, k] (h float32; x rows contiguous).

    With STORE_MASK the keep mask is drawn here (the only draw) and written as bits to mask_ptr.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    row_in, rank_in = rows < N, ranks < R
    rows64 = rows.to(tl.int64)
    # Pointers advance by BLOCK_K per step: one 64-bit row base per row, no per-element int64 multiply.
    x_ptrs = x_ptr + rows64[:, None] * stride_xn + ks[None, :]
    w_ptrs = w_ptr + ranks[None, :] * stride_wr + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        col_in = (k0 + ks) < K
        x = tl.load(x_ptrs, mask=row_in[:, None] & col_in[None, :], other=0.0)
        if STORE_MASK:
            keep = _dropout_keep(seed, rows, k0, K, p, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
            byte_cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            tl.store(mask_ptr + rows64[:, None] * stride_mn + byte_cols[None, :], _pack_bits(keep, BLOCK_N, BLOCK_K),
                     mask=row_in[:, None] & (byte_cols < (K + 7) // 8)[None, :])
        w = tl.load(w_ptrs, mask=col_in[:, None] & rank_in[None, :], other=0.0)
        if NATIVE_DOT:
            acc = tl.dot(x, w.to(x.dtype), acc)
        else:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    tl.store(h_ptr + rows64[:, None] * stride_hn + ranks[None, :], acc * out_scale,
             mask=row_in[:, None] & rank_in[None, :])


@triton.jit
def _lora_up_kernel(out_ptr, h_ptr, w_ptr, mask_ptr, bias_ptr,
                    stride_on, stride_hn, stride_wm, stride_wr, stride_mn,
                    scale, N, M, R,
                    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                    NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[n, m] (+)= bias[m] + scale * sum_r h[n, r] w[m, r] (* keep bit (n, m)); out rows contiguous.

    ACCUMULATE reads out and adds to it (in place); otherwise out is only written, which is how the
    LoRA term is placed before a cuBLAS GEMM that adds the base product with beta = 1.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_M
    cols = col0 + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_in, col_in, rank_in = rows < N, cols < M, ranks < R
    rows64 = rows.to(tl.int64)
    out_ptrs = out_ptr + rows64[:, None] * stride_on + cols[None, :]
    inside = row_in[:, None] & col_in[None, :]
    h = tl.load(h_ptr + rows64[:, None] * stride_hn + ranks[None, :], mask=row_in[:, None] & rank_in[None, :],
                other=0.0)
    # Loaded in w's own (M, R) orientation and transposed in registers: loading the (R, M) tile of a
    # rank-contiguous B directly made ptxas use a stack frame at sm_90a.
    w = tl.load(w_ptr + cols[:, None] * stride_wm + ranks[None, :] * stride_wr,
                mask=col_in[:, None] & rank_in[None, :], other=0.0)
    if NATIVE_DOT:
        out_dtype: tl.constexpr = out_ptr.dtype.element_ty
        delta = tl.dot(h.to(out_dtype), tl.trans(w.to(out_dtype)))
    else:
        delta = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=DOT_PRECISION)
    delta = delta * scale
    if HAS_MASK:
        byte_cols = col0 // 8 + tl.arange(0, BLOCK_M // 8)
        packed = tl.load(mask_ptr + rows64[:, None] * stride_mn + byte_cols[None, :],
                         mask=row_in[:, None] & (byte_cols < (M + 7) // 8)[None, :], other=0)
        delta = tl.where(_unpack_bits(packed, BLOCK_N, BLOCK_M), delta, 0.0)
    if HAS_BIAS:
        delta += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if ACCUMULATE:
        delta += tl.load(out_ptrs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptrs, delta.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _per_example_grad_kernel(u_ptr, v_ptr, rows_ptr, c_ptr, mask_ptr, cu_ptr, grad_ptr, fisher_ptr,
                             stride_un, stride_vn, stride_mn, stride_ps, stride_pd,
                             scale, D, R_SEL, T, NUM_EXAMPLES, EXAMPLES_PER_SPLIT,
                             HAS_MASK: tl.constexpr, HAS_EXAMPLE_SCALE: tl.constexpr, WITH_FISHER: tl.constexpr,
                             ONE_TOKEN_EXAMPLES: tl.constexpr, HAS_CU_SEQLENS: tl.constexpr,
                             NATIVE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per-example LoRA weight gradients G_n[d, j] = scale * sum_{t in n} keep?(u)[t, d] v[t, rows[j]].

    Program (d-tile, split) walks the examples of its split once, contracting each example's tokens
    (example n owns tokens cu[n] .. cu[n+1]-1 with HAS_CU_SEQLENS, else n*T .. n*T+T-1), and writes the
    split's partial sums of G_n and of (c_n G_n)^2 to grad[split] / fisher[split] (float32, (D, R_SEL)
    each). Cutting the contraction at example boundaries is what makes the Fisher free: the sum and the
    sum of squares come from the same tiles.
    """
    pid_d, pid_s = tl.program_id(0), tl.program_id(1)
    col0 = pid_d * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    sel = tl.arange(0, BLOCK_R)
    col_in, sel_in = cols < D, sel < R_SEL
    byte_cols = col0 // 8 + tl.arange(0, BLOCK_D // 8)
    byte_in = byte_cols < (D + 7) // 8
    ranks = tl.load(rows_ptr + sel, mask=sel_in, other=0).to(tl.int32)
    grad = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    fisher = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    n_start = pid_s * EXAMPLES_PER_SPLIT
    n_end = tl.minimum(n_start + EXAMPLES_PER_SPLIT, NUM_EXAMPLES)
    if ONE_TOKEN_EXAMPLES:
        # One token per example: G_n is an outer product, so sum_n (c_n G_n)^2 is itself a GEMM of
        # squares, (c^2 u^2)^T v^2, and whole blocks of examples go through tl.dot at once. The squares
        # are dotted in float32 (fp16 squares overflow).
        for t0 in range(n_start, n_end, BLOCK_T):
            toks = t0 + tl.arange(0, BLOCK_T)
            tok_in = toks < n_end
            toks64 = toks.to(tl.int64)
            u = tl.load(u_ptr + toks64[:, None] * stride_un + cols[None, :],
                        mask=tok_in[:, None] & col_in[None, :], other=0.0)
            if HAS_MASK:
                packed = tl.load(mask_ptr + toks64[:, None] * stride_mn + byte_cols[None, :],
                                 mask=tok_in[:, None] & byte_in[None, :], other=0)
                u = tl.where(_unpack_bits(packed, BLOCK_T, BLOCK_D), u, tl.zeros_like(u))
            v = tl.load(v_ptr + toks64[:, None] * stride_vn + ranks[None, :],
                        mask=tok_in[:, None] & sel_in[None, :], other=0.0)
            if NATIVE_DOT:
                grad = tl.dot(tl.trans(u), v.to(u.dtype), grad)
            else:
                grad = tl.dot(tl.trans(u.to(tl.float32)), v.to(tl.float32), grad, input_precision=DOT_PRECISION)
            if WITH_FISHER:
                u32 = u.to(tl.float32)
                if HAS_EXAMPLE_SCALE:
                    u32 = u32 * tl.load(c_ptr + toks, mask=tok_in, other=0.0).to(tl.float32)[:, None]
                v32 = v.to(tl.float32)
                fisher = tl.dot(tl.trans(u32 * u32), v32 * v32, fisher, input_precision=DOT_PRECISION)
        grad = grad * scale
        fisher = fisher * (scale * scale)
    else:
        for example in range(n_start, n_end):
            if HAS_CU_SEQLENS:
                tok_start = tl.load(cu_ptr + example)
                tok_end = tl.load(cu_ptr + example + 1)
            else:
                tok_start = example * T
                tok_end = tok_start + T
            g_n = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
            for t0 in range(tok_start, tok_end, BLOCK_T):
                toks = t0 + tl.arange(0, BLOCK_T)
                tok_in = toks < tok_end
                toks64 = toks.to(tl.int64)
                u = tl.load(u_ptr + toks64[:, None] * stride_un + cols[None, :],
                            mask=tok_in[:, None] & col_in[None, :], other=0.0)
                if HAS_MASK:
                    packed = tl.load(mask_ptr + toks64[:, None] * stride_mn + byte_cols[None, :],
                                     mask=tok_in[:, None] & byte_in[None, :], other=0)
                    u = tl.where(_unpack_bits(packed, BLOCK_T, BLOCK_D), u, tl.zeros_like(u))
                v = tl.load(v_ptr + toks64[:, None] * stride_vn + ranks[None, :],
                            mask=tok_in[:, None] & sel_in[None, :], other=0.0)
                if NATIVE_DOT:
                    g_n = tl.dot(tl.trans(u), v.to(u.dtype), g_n)
                else:
                    g_n = tl.dot(tl.trans(u.to(tl.float32)), v.to(tl.float32), g_n, input_precision=DOT_PRECISION)
            g_n = g_n * scale
            grad += g_n
            if WITH_FISHER:
                if HAS_EXAMPLE_SCALE:
                    g_n = g_n * tl.load(c_ptr + example).to(tl.float32)
                fisher += g_n * g_n
    out_off = pid_s.to(tl.int64) * stride_ps + cols[:, None] * stride_pd + sel[None, :]
    inside = col_in[:, None] & sel_in[None, :]
    tl.store(grad_ptr + out_off, grad, mask=inside)
    if WITH_FISHER:
        tl.store(fisher_ptr + out_off, fisher, mask=inside)


# ---------------------------------------------------------------------------------------------------
# Launchers. Each ``plan_*`` only describes the launch (used by the compile check on meta tensors);
# the public functions allocate, plan and run.


def _rows_contiguous(t: torch.Tensor, what: str) -> None:
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{what} must be a 2-D tensor with contiguous rows (stride(1) == 1), got strides "
                         f"{tuple(t.stride())}; call .contiguous() first")


def plan_keep_mask(mask: torch.Tensor, width: int, p: float, seed: int) -> Launch:
    config, warps, stages = _split_config(pick("keep_mask", mask.shape[0]))
    grid = (triton.cdiv(mask.shape[0], config["BLOCK_N"]), triton.cdiv(width, config["BLOCK_K"]))
    return Launch(_keep_mask_kernel, grid, dict(mask_ptr=mask, stride_mn=mask.stride(0), seed=seed, p=p,
                                                N=mask.shape[0], K=width), config, warps, stages)


def plan_lora_down(x: torch.Tensor, w_rk: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None, p: float,
                   seed: int) -> Launch:
    n, k = x.shape
    r = w_rk.shape[0]
    config, warps, stages = _split_config(pick("lora_down", n, x.dtype == torch.float32))
    store_mask = mask is not None
    args = dict(x_ptr=x, w_ptr=w_rk, h_ptr=h, mask_ptr=mask if store_mask else h,
                stride_xn=x.stride(0), stride_wr=w_rk.stride(0), stride_wk=w_rk.stride(1), stride_hn=h.stride(0),
                stride_mn=mask.stride(0) if store_mask else 0,
                seed=seed, p=p, out_scale=1.0 / (1.0 - p) if store_mask else 1.0, N=n, K=k, R=r)
    constexprs = dict(STORE_MASK=store_mask, **dot_mode(x.dtype), **config, BLOCK_R=rank_block(r))
    return Launch(_lora_down_kernel, (triton.cdiv(n, config["BLOCK_N"]),), args, constexprs, warps, stages)


def plan_lora_up(out: torch.Tensor, h: torch.Tensor, w_mr: torch.Tensor, scale: float, mask: torch.Tensor | None,
                 bias: torch.Tensor | None, accumulate: bool) -> Launch:
    n, m = out.shape
    r = h.shape[1]
    config, warps, stages = _split_config(pick("lora_up", n, out.dtype == torch.float32))
    args = dict(out_ptr=out, h_ptr=h, w_ptr=w_mr, mask_ptr=mask if mask is not None else h,
                bias_ptr=bias if bias is not None else h,
                stride_on=out.stride(0), stride_hn=h.stride(0), stride_wm=w_mr.stride(0), stride_wr=w_mr.stride(1),
                stride_mn=mask.stride(0) if mask is not None else 0, scale=scale, N=n, M=m, R=r)
    constexprs = dict(ACCUMULATE=accumulate, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                      **dot_mode(out.dtype), **config, BLOCK_R=rank_block(r))
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]))
    return Launch(_lora_up_kernel, grid, args, constexprs, warps, stages)


def plan_per_example_grads(u, v, rows, c, mask, cu_seqlens, grad, fisher, tokens_per_example: int,
                           num_examples: int, per_split: int, scale: float) -> Launch:
    n_tok, d = u.shape
    config, warps, stages = _split_config(pick("per_example_grad", n_tok, u.dtype == torch.float32))
    splits = grad.shape[0]
    # When a feature is off its pointer argument is never read; grad stands in for it.
    args = dict(u_ptr=u, v_ptr=v, rows_ptr=rows, c_ptr=c if c is not None else grad,
                mask_ptr=mask if mask is not None else grad, cu_ptr=cu_seqlens if cu_seqlens is not None else rows,
                grad_ptr=grad, fisher_ptr=fisher if fisher is not None else grad,
                stride_un=u.stride(0), stride_vn=v.stride(0), stride_mn=mask.stride(0) if mask is not None else 0,
                stride_ps=grad.stride(0), stride_pd=grad.stride(1),
                scale=scale, D=d, R_SEL=rows.numel(), T=tokens_per_example, NUM_EXAMPLES=num_examples,
                EXAMPLES_PER_SPLIT=per_split)
    constexprs = dict(HAS_MASK=mask is not None, HAS_EXAMPLE_SCALE=c is not None, WITH_FISHER=fisher is not None,
                      ONE_TOKEN_EXAMPLES=cu_seqlens is None and tokens_per_example == 1,
                      HAS_CU_SEQLENS=cu_seqlens is not None, **dot_mode(u.dtype), **config,
                      BLOCK_R=rank_block(rows.numel()))
    grid = (triton.cdiv(d, config["BLOCK_D"]), splits)
    return Launch(_per_example_grad_kernel, grid, args, constexprs, warps, stages)


def keep_bits(num_rows: int, width: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The packed dropout keep mask (uint8, (num_rows, ceil(width / 8))) that the kernels draw for ``seed``."""
    mask = _alloc(num_rows, mask_bytes(width), dtype=torch.uint8, device=device)
    if mask.numel():
        plan_keep_mask(mask, width, p, seed)()
    return mask


def keep_mask(num_rows: int, width: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The dropout keep-mask (bool, (num_rows, width)) that the kernels use for ``seed``."""
    return unpack_keep_bits(keep_bits(num_rows, width, p, seed, device), width)


def lora_down(x: torch.Tensor, w_rk: torch.Tensor, p: float = 0.0,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h, keep bits): h = float32 (N, R) = drop(x) @ w_rk^T for x (N, K) with contiguous rows and w_rk any
    (R, K) view; with p > 0 the keep mask is drawn once and returned packed (else None)."""
    _rows_contiguous(x, "x")
    n, k = x.shape
    r = w_rk.shape[0]
    h = _alloc(n, r, dtype=torch.float32, device=x.device)
    mask = _alloc(n, mask_bytes(k), dtype=torch.uint8, device=x.device) if p > 0 else None
    if n == 0:
        return h, mask
    if k == 0:
        return h.zero_(), mask
    plan_lora_down(x, w_rk, h, mask, p, seed)()
    return h, mask


def lora_up_(out: torch.Tensor, h: torch.Tensor, w_mr: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, accumulate: bool = True) -> torch.Tensor:
    """out (N, M) = [out +] [bias +] scale * (h @ w_mr^T) [* keep bits], in place; w_mr any (M, R) view.

    With accumulate=False out is write-only (its old contents are ignored), to be followed by a GEMM
    that adds into it with beta = 1 (``out.addmm_(a, b)``).
    """
    _rows_contiguous(out, "out")
    n, m = out.shape
    if n == 0 or m == 0:
        return out
    if h.shape[1] == 0:
        if not accumulate:
            out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
        elif bias is not None:
            out.add_(bias)
        return out
    plan_lora_up(out, h.contiguous(), w_mr, scale, mask, bias, accumulate)()
    return out


def example_splits(num_examples: int, d_tiles: int, device: torch.device) -> int:
    """How many example ranges to run side by side so that the grid fills the machine."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: still exercise the split path on small test shapes
    return max(1, min(num_examples, triton.cdiv(target, d_tiles)))


def per_example_grads(u: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, example_scale: torch.Tensor | None,
                      tokens_per_example: int, scale: float, with_fisher: bool, mask: torch.Tensor | None = None,
                      cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_n G_n and sum_n (c_n G_n)^2 (float32, (D, len(rows)) each) with
    G_n = scale * keep?(u_n)^T v_n[:, rows]; u (N, D) with contiguous rows, v (N, R), mask the packed keep
    bits of u or None. Examples are the cu_seqlens segments when given, else runs of tokens_per_example."""
    _rows_contiguous(u, "u")
    v = v.contiguous()
    n_tok, d = u.shape
    r_sel = rows.numel()
    if cu_seqlens is not None:
        num_examples = cu_seqlens.numel() - 1
    else:
        num_examples = n_tok // tokens_per_example if tokens_per_example else 0
    d_tiles = triton.cdiv(d, pick("per_example_grad", n_tok, u.dtype == torch.float32)["BLOCK_D"])
    if num_examples == 0 or d == 0 or r_sel == 0 or n_tok == 0:
        zeros = torch.zeros(d, r_sel, dtype=torch.float32, device=u.device)
        return zeros, (zeros.clone() if with_fisher else None)
    splits = example_splits(num_examples, d_tiles, u.device)
    per_split = triton.cdiv(num_examples, splits)
    splits = triton.cdiv(num_examples, per_split)
    grad = _alloc(splits, d, r_sel, dtype=torch.float32, device=u.device)
    fisher = _alloc(splits, d, r_sel, dtype=torch.float32, device=u.device) if with_fisher else None
    c = example_scale.contiguous() if example_scale is not None else None
    plan_per_example_grads(u, v, rows.contiguous(), c, mask, cu_seqlens, grad, fisher, tokens_per_example,
                           num_examples, per_split, scale)()
    # Partial sums per split are reduced here (not with atomics) so results are deterministic.
    return grad.sum(0), (fisher.sum(0) if with_fisher else None)
