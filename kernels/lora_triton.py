"""Triton kernels (and their launchers) behind ``kernels.multi_lora_linear``.

Notation: tokens n (N rows), a wide side of width D (d_in or d_out) and a narrow LoRA rank side R.
Every kernel accumulates in float32 and upcasts its operands before ``tl.dot``: the Triton
interpreter computes bf16 dots wrongly, and on GPU the upcast costs nothing that matters because
these kernels are bound by memory traffic over the wide side, not by the rank-R FLOPs. For 16-bit
operands the fp32 dot runs in tf32, which holds bf16 and fp16 values exactly.

Dropout: element (n, k) of x is kept when its Philox draw for ``seed`` (see ``_dropout_keep``) is >= p,
and then scaled by 1 / (1 - p). The draw depends only on (seed, n, k, d_in), never on block sizes, so
every kernel regenerates the same mask and backward needs no stored mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Block sizes are fixed, not autotuned: no GPU was available to tune them (benchmarks/bench_lora4.py
# is the harness to do so). tl.dot needs every block dimension >= 16; dropout needs multiples of 4.
_DOWN_BLOCK_N, _DOWN_BLOCK_K = 32, 128
_UP_BLOCK_N, _UP_BLOCK_M = 64, 128
_FISHER_BLOCK_D, _FISHER_BLOCK_T = 64, 32
_MIN_DOT = 16


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for kernel outputs (one place, so tests can poison it with NaN)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def rank_block(r: int) -> int:
    """Power-of-two block covering ``r`` rank columns (at least the tl.dot minimum)."""
    return max(_MIN_DOT, triton.next_power_of_2(max(r, 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """tf32 holds 16-bit operands exactly; fp32 operands need the full-precision dot."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _dropout_keep(seed, rows, col0, width, p, BLOCK_K: tl.constexpr):
    """Keep-mask of the block rows x [col0, col0 + BLOCK_K) of a row-major (*, width) input.

    One Philox call yields four numbers, so element (n, k) takes lane k % 4 of counter
    n * ceil(width / 4) + k // 4: a quarter of the RNG work of one call per element. col0 and BLOCK_K
    are multiples of 4, so the counters of a block never straddle its edge.
    """
    quads = col0 // 4 + tl.arange(0, BLOCK_K // 4).to(tl.int64)
    counters = rows[:, None] * ((width + 3) // 4) + quads[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    lanes = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [..., i, j] holds lane 2 * i + j
    bits = tl.reshape(lanes, (rows.shape[0], BLOCK_K))
    return tl.random.uint_to_uniform_float(bits) >= p


@triton.jit
def _keep_mask_kernel(mask_ptr, stride_mn, stride_mk, seed, p, N, K,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    keep = _dropout_keep(seed, rows, tl.program_id(1).to(tl.int64) * BLOCK_K, K, p, BLOCK_K)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    tl.store(mask_ptr + rows[:, None] * stride_mn + cols[None, :] * stride_mk, keep.to(tl.int8), mask=inside)


@triton.jit
def _lora_down_kernel(x_ptr, w_ptr, h_ptr,
                      stride_xn, stride_xk, stride_wr, stride_wk, stride_hn, stride_hr,
                      seed, p, N, K, R,
                      APPLY_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """h[n, r] = sum_k drop(x)[n, k] * w[r, k], h float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    ranks = tl.arange(0, BLOCK_R).to(tl.int64)
    row_in, rank_in = rows < N, ranks < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_in = cols < K
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xk,
                    mask=row_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
        if APPLY_DROPOUT:
            keep = _dropout_keep(seed, rows, k0, K, p, BLOCK_K)
            x = tl.where(keep, x / (1.0 - p), 0.0)
        w = tl.load(w_ptr + ranks[None, :] * stride_wr + cols[:, None] * stride_wk,
                    mask=col_in[:, None] & rank_in[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    tl.store(h_ptr + rows[:, None] * stride_hn + ranks[None, :] * stride_hr, acc,
             mask=row_in[:, None] & rank_in[None, :])


@triton.jit
def _lora_up_add_kernel(out_ptr, h_ptr, w_ptr,
                        stride_on, stride_om, stride_hn, stride_hr, stride_wm, stride_wr,
                        scale, seed, p, N, M, R,
                        APPLY_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[n, m] += scale * (sum_r h[n, r] * w[m, r]) (* dropout keep/(1-p) at (n, m)), in place."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    ranks = tl.arange(0, BLOCK_R).to(tl.int64)
    row_in, col_in, rank_in = rows < N, cols < M, ranks < R
    h = tl.load(h_ptr + rows[:, None] * stride_hn + ranks[None, :] * stride_hr,
                mask=row_in[:, None] & rank_in[None, :], other=0.0).to(tl.float32)
    w = tl.load(w_ptr + ranks[:, None] * stride_wr + cols[None, :] * stride_wm,
                mask=rank_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
    delta = tl.dot(h, w, input_precision=DOT_PRECISION) * scale
    if APPLY_DROPOUT:
        keep = _dropout_keep(seed, rows, tl.program_id(1).to(tl.int64) * BLOCK_M, M, p, BLOCK_M)
        delta = tl.where(keep, delta / (1.0 - p), 0.0)
    out_ptrs = out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_om
    inside = row_in[:, None] & col_in[None, :]
    out = tl.load(out_ptrs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (out + delta).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _per_example_grad_kernel(u_ptr, v_ptr, rows_ptr, c_ptr, grad_ptr, fisher_ptr,
                             stride_un, stride_ud, stride_vn, stride_vr, stride_ps, stride_pd, stride_pr,
                             scale, seed, p, D, R_SEL, T, NUM_EXAMPLES, EXAMPLES_PER_SPLIT,
                             APPLY_DROPOUT: tl.constexpr, HAS_EXAMPLE_SCALE: tl.constexpr,
                             WITH_FISHER: tl.constexpr, ONE_TOKEN_EXAMPLES: tl.constexpr,
                             DOT_PRECISION: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per-example LoRA weight gradients G_n[d, j] = scale * sum_{t in n} drop?(u)[t, d] v[t, rows[j]].

    Program (d-tile, split) walks the examples of its split once, contracting each example's tokens
    (example n owns tokens n*T .. n*T+T-1), and writes the split's partial sums of G_n and of
    (c_n G_n)^2 to grad[split] / fisher[split] (float32, (D, R_SEL) each). Cutting the contraction
    at example boundaries is what makes the Fisher free: the sum and the sum of squares come from
    the same tiles.
    """
    pid_d, pid_s = tl.program_id(0), tl.program_id(1)
    col0 = pid_d.to(tl.int64) * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D).to(tl.int64)
    sel = tl.arange(0, BLOCK_R)
    col_in, sel_in = cols < D, sel < R_SEL
    ranks = tl.load(rows_ptr + sel, mask=sel_in, other=0).to(tl.int64)
    grad = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    fisher = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    n_start = pid_s * EXAMPLES_PER_SPLIT
    n_end = tl.minimum(n_start + EXAMPLES_PER_SPLIT, NUM_EXAMPLES)
    if ONE_TOKEN_EXAMPLES:
        # One token per example: G_n is an outer product, so sum_n (c_n G_n)^2 is itself a GEMM of
        # squares, (c^2 u^2)^T v^2, and whole blocks of examples go through tl.dot at once.
        for t0 in range(n_start, n_end, BLOCK_T):
            toks = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            tok_in = toks < n_end
            u = tl.load(u_ptr + toks[:, None] * stride_un + cols[None, :] * stride_ud,
                        mask=tok_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
            if APPLY_DROPOUT:
                u = tl.where(_dropout_keep(seed, toks, col0, D, p, BLOCK_D), u / (1.0 - p), 0.0)
            v = tl.load(v_ptr + toks[:, None] * stride_vn + ranks[None, :] * stride_vr,
                        mask=tok_in[:, None] & sel_in[None, :], other=0.0).to(tl.float32)
            grad += tl.dot(tl.trans(u), v, input_precision=DOT_PRECISION)
            if WITH_FISHER:
                if HAS_EXAMPLE_SCALE:
                    u = u * tl.load(c_ptr + toks, mask=tok_in, other=0.0).to(tl.float32)[:, None]
                fisher += tl.dot(tl.trans(u * u), v * v, input_precision=DOT_PRECISION)
        grad = grad * scale
        fisher = fisher * (scale * scale)
    else:
        example = n_start.to(tl.int64)  # carried as int64 so token offsets cannot overflow
        for _ in range(n_start, n_end):
            g_n = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
            for t0 in range(0, T, BLOCK_T):
                t_local = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
                tok_in = t_local < T
                toks = example * T + t_local
                u = tl.load(u_ptr + toks[:, None] * stride_un + cols[None, :] * stride_ud,
                            mask=tok_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
                if APPLY_DROPOUT:
                    u = tl.where(_dropout_keep(seed, toks, col0, D, p, BLOCK_D), u / (1.0 - p), 0.0)
                v = tl.load(v_ptr + toks[:, None] * stride_vn + ranks[None, :] * stride_vr,
                            mask=tok_in[:, None] & sel_in[None, :], other=0.0).to(tl.float32)
                g_n += tl.dot(tl.trans(u), v, input_precision=DOT_PRECISION)
            g_n = g_n * scale
            grad += g_n
            if WITH_FISHER:
                if HAS_EXAMPLE_SCALE:
                    g_n = g_n * tl.load(c_ptr + example).to(tl.float32)
                fisher += g_n * g_n
            example += 1
    out_off = pid_s.to(tl.int64) * stride_ps + cols[:, None] * stride_pd + sel[None, :].to(tl.int64) * stride_pr
    inside = col_in[:, None] & sel_in[None, :]
    tl.store(grad_ptr + out_off, grad, mask=inside)
    if WITH_FISHER:
        tl.store(fisher_ptr + out_off, fisher, mask=inside)


def keep_mask(num_rows: int, width: int, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The dropout keep-mask (bool, (num_rows, width)) that the kernels use for ``seed``."""
    mask = _alloc(num_rows, width, dtype=torch.int8, device=device)
    if mask.numel():
        grid = (triton.cdiv(num_rows, _UP_BLOCK_N), triton.cdiv(width, _UP_BLOCK_M))
        _keep_mask_kernel[grid](mask, mask.stride(0), mask.stride(1), seed, p, num_rows, width,
                                BLOCK_N=_UP_BLOCK_N, BLOCK_K=_UP_BLOCK_M)
    return mask.bool()


def lora_down(x: torch.Tensor, w_rk: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """float32 (N, R) = drop(x) @ w_rk^T for x (N, K) and w_rk any (R, K) view (strides honoured)."""
    n, k = x.shape
    r = w_rk.shape[0]
    h = _alloc(n, r, dtype=torch.float32, device=x.device)
    if n == 0:
        return h
    if k == 0:
        return h.zero_()
    _lora_down_kernel[(triton.cdiv(n, _DOWN_BLOCK_N),)](
        x, w_rk, h, x.stride(0), x.stride(1), w_rk.stride(0), w_rk.stride(1), h.stride(0), h.stride(1),
        seed, p, n, k, r, APPLY_DROPOUT=p > 0, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_N=_DOWN_BLOCK_N, BLOCK_K=_DOWN_BLOCK_K, BLOCK_R=rank_block(r))
    return h


def lora_up_add_(out: torch.Tensor, h: torch.Tensor, w_mr: torch.Tensor, scale: float, p: float,
                 seed: int) -> torch.Tensor:
    """out (N, M) += scale * (h @ w_mr^T) [* dropout keep / (1-p)], in place; w_mr any (M, R) view."""
    n, m = out.shape
    r = h.shape[1]
    if n == 0 or m == 0 or r == 0:
        return out
    grid = (triton.cdiv(n, _UP_BLOCK_N), triton.cdiv(m, _UP_BLOCK_M))
    _lora_up_add_kernel[grid](
        out, h, w_mr, out.stride(0), out.stride(1), h.stride(0), h.stride(1), w_mr.stride(0), w_mr.stride(1),
        scale, seed, p, n, m, r, APPLY_DROPOUT=p > 0, DOT_PRECISION=dot_precision(out.dtype),
        BLOCK_N=_UP_BLOCK_N, BLOCK_M=_UP_BLOCK_M, BLOCK_R=rank_block(r))
    return out


def _example_splits(num_examples: int, d_tiles: int, device: torch.device) -> int:
    """How many example ranges to run side by side so that the grid fills the machine."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: still exercise the split path on small test shapes
    return max(1, min(num_examples, triton.cdiv(target, d_tiles)))


def per_example_grads(u: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, example_scale: torch.Tensor | None,
                      tokens_per_example: int, scale: float, p: float, seed: int,
                      with_fisher: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_n G_n and sum_n (c_n G_n)^2 (float32, (D, len(rows)) each) with
    G_n = scale * drop?(u_n)^T v_n[:, rows]; u (N, D) (dropout applied when p > 0), v (N, R)."""
    n_tok, d = u.shape
    r_sel = rows.numel()
    num_examples = n_tok // tokens_per_example if tokens_per_example else 0
    d_tiles = triton.cdiv(d, _FISHER_BLOCK_D)
    if num_examples == 0 or d == 0 or r_sel == 0:
        zeros = torch.zeros(d, r_sel, dtype=torch.float32, device=u.device)
        return zeros, (zeros.clone() if with_fisher else None)
    splits = _example_splits(num_examples, d_tiles, u.device)
    per_split = triton.cdiv(num_examples, splits)
    splits = triton.cdiv(num_examples, per_split)
    grad = _alloc(splits, d, r_sel, dtype=torch.float32, device=u.device)
    # When a feature is off its pointer argument is never read; grad stands in for it.
    fisher = _alloc(splits, d, r_sel, dtype=torch.float32, device=u.device) if with_fisher else grad
    c = example_scale if example_scale is not None else grad
    _per_example_grad_kernel[(d_tiles, splits)](
        u, v, rows, c, grad, fisher,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), grad.stride(0), grad.stride(1), grad.stride(2),
        scale, seed, p, d, r_sel, tokens_per_example, num_examples, per_split,
        APPLY_DROPOUT=p > 0, HAS_EXAMPLE_SCALE=example_scale is not None, WITH_FISHER=with_fisher,
        ONE_TOKEN_EXAMPLES=tokens_per_example == 1, DOT_PRECISION=dot_precision(u.dtype),
        BLOCK_D=_FISHER_BLOCK_D, BLOCK_T=_FISHER_BLOCK_T, BLOCK_R=rank_block(r_sel))
    # Partial sums per split are reduced here (not with atomics) so results are deterministic.
    return grad.sum(0), (fisher.sum(0) if with_fisher else None)
