"""Fused multi-group LoRA kernels (kernels.multi_lora_linear) against a float64 reference and the eager path.

Without a GPU the kernels run in the Triton interpreter. Triton 3.8 reads TRITON_INTERPRET when a
function is decorated with @triton.jit, and triton.language's own helpers (tl.rand, ...) are decorated
when triton is first imported; so the variable must be set before ``import triton`` anywhere in the
process. This module sets it at the top; if something imported triton earlier (e.g. transformers' LLaMA),
the kernel tests are skipped here and ``test_kernel_suite_in_fresh_process`` reruns this file in a
subprocess with the variable set, so they always run.
"""
import os
import sys

_TRITON_WAS_IMPORTED = "triton" in sys.modules

import torch  # noqa: E402  (torch does not import triton)

if not _TRITON_WAS_IMPORTED and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels import lora_triton  # noqa: E402
from kernels.multi_lora_linear import dropout_keep_mask, multi_lora_linear_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS_RUNNABLE = DEVICE.type == "cuda" or isinstance(tl.rand, InterpretedFunction)
needs_kernels = pytest.mark.skipif(
    not KERNELS_RUNNABLE,
    reason="triton was imported before TRITON_INTERPRET=1 could be set; test_kernel_suite_in_fresh_process "
           "runs these tests in a subprocess")

RANK, GROUPS = 8, 4
R = RANK * GROUPS
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def group_rows(groups) -> torch.Tensor:
    return torch.tensor([g * RANK + i for g in sorted(groups) for i in range(RANK)], dtype=torch.long)


@pytest.fixture(autouse=True)
def poison_kernel_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN (all bits set for masks): unwritten entries show up."""
    def poisoned(*shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else (255 if dtype == torch.uint8 else -1)
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(lora_triton, "_alloc", poisoned)


def make_case(batch, seq, d_in, d_out, dtype, seed=0, with_bias=True):
    """Inputs in ``dtype``; seq=None gives a 2-D (batch, d_in) input of one-token examples."""
    g = torch.Generator().manual_seed(seed)
    x_shape = (batch, seq, d_in) if seq is not None else (batch, d_in)
    x = torch.randn(x_shape, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    b = torch.randn(d_out, generator=g) if with_bias else None
    a = torch.randn(R, d_in, generator=g) / math.sqrt(d_in)
    bm = torch.randn(d_out, R, generator=g)
    dy = torch.randn(x_shape[:-1] + (d_out,), generator=g)
    c = torch.rand(batch, generator=g) * 2 + 0.25
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return dict(x=cast(x), w=cast(w), b=cast(b), a=cast(a), bm=cast(bm), dy=cast(dy), c=c.to(DEVICE))


def reference(x, w, b, a, bm, dy, s, keep, p, rows, c):
    """float64 y, dx, dA, dB, Fisher A, Fisher B; per-example gradients by autograd, one example at a time."""
    f64 = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    x, w, b, a, bm, dy, c = map(f64, (x, w, b, a, bm, dy, c))
    x3, dy3 = (x, dy) if x.dim() == 3 else (x[:, None], dy[:, None])
    scaled_keep = torch.ones_like(x3) if keep is None else keep.cpu().double().view_as(x3) / (1 - p)
    x3 = x3.clone().requires_grad_()
    a, bm = a.clone().requires_grad_(), bm.clone().requires_grad_()
    y3 = x3 @ w.t() + (0 if b is None else b) + s * ((x3 * scaled_keep) @ a.t()) @ bm.t()
    dx3, = torch.autograd.grad(y3, x3, dy3, retain_graph=True)
    trainable = torch.zeros(R, dtype=torch.bool)
    trainable[rows] = True
    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(bm)
    fisher_a, fisher_b = torch.zeros_like(a), torch.zeros_like(bm)
    for n in range(x3.shape[0]):
        ga, gb = torch.autograd.grad(y3[n], (a, bm), dy3[n], retain_graph=True)
        ga, gb = ga * trainable[:, None], gb * trainable[None, :]
        grad_a, grad_b = grad_a + ga, grad_b + gb
        cn = 1.0 if c is None else c[n]
        fisher_a, fisher_b = fisher_a + (cn * ga) ** 2, fisher_b + (cn * gb) ** 2
    return [y3.detach().view(dy.shape), dx3.view(x.shape), grad_a, grad_b, fisher_a, fisher_b]


def tolerances(case, s, keep, p, rows, c, dtype):
    """Elementwise bounds: eps(dtype) x a reduction-size factor x the reference run on |inputs|.

    The reference is multilinear in its inputs, so running it on absolute values bounds the magnitude of
    every term of every sum; kernel errors are relative to that, not to the (possibly cancelling) result.
    """
    reduction = max(case["x"].shape[-1], case["w"].shape[0], R, case["x"].shape[1] if case["x"].dim() == 3 else 1)
    factor = EPS[dtype] * (4 + 2 * math.sqrt(reduction))
    absolute = {k: (None if v is None else v.abs()) for k, v in case.items()}
    bounds = reference(absolute["x"], absolute["w"], absolute["b"], absolute["a"], absolute["bm"], absolute["dy"],
                       abs(s), keep, p, rows, None if c is None else c.abs())
    bounds[4:] = [2 * bnd for bnd in bounds[4:]]  # squaring doubles the relative error of the Fisher
    return [factor * bnd + 1e-30 for bnd in bounds]


def run_fused(case, s, p, seed, rows, c, fisher_init=None, fn=multi_lora_linear_triton):
    x = case["x"].clone().requires_grad_()
    a, bm = case["a"].clone().requires_grad_(), case["bm"].clone().requires_grad_()
    fisher_a = torch.zeros(R, x.shape[-1], device=DEVICE) if fisher_init is None else fisher_init[0].clone()
    fisher_b = torch.zeros(case["w"].shape[0], R, device=DEVICE) if fisher_init is None else fisher_init[1].clone()
    y = fn(x, case["w"], case["b"], a, bm, s, p, seed, rows.to(DEVICE), fisher_a, fisher_b, c)
    y.backward(case["dy"])
    return [y.detach(), x.grad, a.grad, bm.grad, fisher_a, fisher_b]


def assert_close(got, want, bound, what):
    got = got.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs()
    worst = (err / bound).argmax()
    assert (err <= bound).all(), (f"{what}: |err| {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e} "
                                  f"(value {want.flatten()[worst]:.4e})")


NAMES = ("y", "dx", "dA", "dB", "fisher_A", "fisher_B")


def check_against_reference(case, dtype, s=0.7, p=0.0, seed=0, groups=(0, 1, 2, 3), c="random", fisher_init=None):
    rows = group_rows(groups)
    scale = case["c"] if c == "random" else c
    got = run_fused(case, s, p, seed, rows, scale, fisher_init)
    keep = None
    if p > 0:
        keep = dropout_keep_mask(case["x"].numel() // case["x"].shape[-1], case["x"].shape[-1], p, seed, DEVICE)
    want = reference(case["x"], case["w"], case["b"], case["a"], case["bm"], case["dy"], s, keep, p, rows, scale)
    if fisher_init is not None:
        want[4], want[5] = want[4] + fisher_init[0].double().cpu(), want[5] + fisher_init[1].double().cpu()
    bounds = tolerances(case, s, keep, p, rows, scale, dtype)
    for name, g, w, bnd in zip(NAMES, got, want, bounds):
        assert_close(g, w, bnd, f"{name} ({dtype}, groups {groups}, p={p})")
    frozen = torch.ones(R, dtype=torch.bool)
    frozen[rows] = False
    assert (got[2][frozen.to(DEVICE)] == 0).all() and (got[3][:, frozen.to(DEVICE)] == 0).all()
    return got


SHAPES = [
    (2, 5, 40, 36),   # odd widths, not multiples of 8/16
    (1, 1, 24, 20),   # batch 1, seq 1
    (7, None, 33, 19),  # 2-D input: seven one-token examples
    (2, 40, 24, 140),  # seq longer than one token block, d_out over one 128-wide tile
    (5, 3, 130, 17),  # d_in over one 128-wide tile, more examples than splits
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s))
def test_matches_float64_reference(shape, dtype):
    check_against_reference(make_case(*shape, dtype, seed=sum(v or 0 for v in shape)), dtype)


@needs_kernels
@pytest.mark.parametrize("groups", [g for k in range(GROUPS + 1) for g in itertools.combinations(range(GROUPS), k)],
                         ids=lambda g: "groups" + "".join(map(str, g)))
def test_every_subset_of_trainable_groups(groups):
    case = make_case(3, 4, 20, 28, torch.float32, seed=len(groups))
    check_against_reference(case, torch.float32, groups=groups)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 6, 37, 24), (9, None, 29, 20)], ids=["3d", "2d"])
def test_dropout_matches_reference_with_materialised_mask(shape, dtype):
    # d_in not a multiple of 4: the Philox counters pack four columns each (see _dropout_keep).
    case = make_case(*shape, dtype, seed=5)
    check_against_reference(case, dtype, p=0.3, seed=1234)


@needs_kernels
def test_padding_rows_example_scale_and_fisher_accumulation():
    case = make_case(3, 6, 20, 24, torch.float32, seed=9)
    case["dy"][0, 4:] = 0  # padded tails of example 0
    case["dy"][2] = 0  # an all-padding example
    case["c"] = torch.tensor([3.0, 0.0, 0.5], device=DEVICE)  # c_n = 0 drops example 1 from the Fisher
    fisher_init = (torch.rand(R, 20, device=DEVICE), torch.rand(24, R, device=DEVICE))
    got = check_against_reference(case, torch.float32, groups=(0, 2), fisher_init=fisher_init)
    # Example 2 contributes nothing; example 1 has c_n = 0, so Fisher = init + example 0's square only.
    c_none = check_against_reference(case, torch.float32, groups=(0, 2), c=None)
    assert not torch.allclose(got[4] - fisher_init[0], c_none[4])


def recover_masks(d_in, p, seed):
    """The keep-masks forward and backward actually used, read back through identity-like A and B."""
    batch, seq, d_out = 3, 5, R
    x = torch.randn(batch, seq, d_in, device=DEVICE) + 3.0  # never 0, so a zero means dropped
    w = torch.zeros(d_out, d_in, device=DEVICE)
    a = torch.zeros(R, d_in, device=DEVICE)
    a[:d_in, :d_in] = torch.eye(d_in)
    bm = torch.eye(d_out, R, device=DEVICE)
    x.requires_grad_()
    y = multi_lora_linear_triton(x, w, None, a, bm, 1.0, p, seed, group_rows(range(GROUPS)).to(DEVICE),
                                 None, None, None)
    fwd_keep = y[..., :d_in] != 0  # y = drop(x) A^T B^T = drop(x) padded to d_out columns
    y.backward(torch.ones_like(y))  # dx = (1 B A) * mask/(1-p) = mask/(1-p)
    bwd_keep = x.grad != 0
    return fwd_keep.reshape(-1, d_in), bwd_keep.reshape(-1, d_in), x.grad.reshape(-1, d_in)


@needs_kernels
def test_backward_uses_the_forward_dropout_mask():
    p, seed, d_in = 0.25, 77, 21
    fwd_keep, bwd_keep, dx = recover_masks(d_in, p, seed)
    helper = dropout_keep_mask(fwd_keep.shape[0], d_in, p, seed, DEVICE)
    assert torch.equal(fwd_keep, bwd_keep)
    assert torch.equal(fwd_keep, helper)
    torch.testing.assert_close(dx[bwd_keep], torch.full_like(dx[bwd_keep], 1 / (1 - p)))
    # Keep rate within 5 binomial standard deviations of 1 - p.
    n = fwd_keep.numel()
    assert abs(fwd_keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    other_seed = dropout_keep_mask(fwd_keep.shape[0], d_in, p, seed + 1, DEVICE)
    assert not torch.equal(helper, other_seed)
    assert torch.equal(helper, dropout_keep_mask(fwd_keep.shape[0], d_in, p, seed, DEVICE))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 40, 36), (6, None, 17, 30)], ids=["3d", "2d"])
def test_matches_eager_reference(shape, dtype):
    from mage.lora_function import multi_lora_linear_eager

    case = make_case(*shape, dtype, seed=3)
    rows = group_rows((0, 1, 2))
    fused = run_fused(case, 0.5, 0.0, 0, rows, case["c"])
    eager = run_fused(case, 0.5, 0.0, 0, rows, case["c"], fn=multi_lora_linear_eager)
    bounds = tolerances(case, 0.5, None, 0.0, rows, case["c"], dtype)
    for name, f, e, bnd in zip(NAMES, fused, eager, bounds):
        # Each path is within its bound of the exact result, so they are within twice the bound of each other.
        assert_close(f, e.double().cpu(), 2 * bnd, f"{name} fused vs eager ({dtype})")


@needs_kernels
def test_float32_adapters_on_half_model_and_no_fisher():
    case = make_case(2, 3, 20, 24, torch.float16, seed=11)
    case["a"], case["bm"] = case["a"].float(), case["bm"].float()
    rows = group_rows((1, 3))
    x = case["x"].clone().requires_grad_()
    a, bm = case["a"].clone().requires_grad_(), case["bm"].clone().requires_grad_()
    y = multi_lora_linear_triton(x, case["w"], case["b"], a, bm, 1.0, 0.0, 0, rows.to(DEVICE), None, None, None)
    y.backward(case["dy"])
    want = reference(case["x"], case["w"], case["b"], case["a"], case["bm"], case["dy"], 1.0, None, 0.0, rows, None)
    bounds = tolerances(case, 1.0, None, 0.0, rows, None, torch.float16)
    assert a.grad.dtype == torch.float32 and bm.grad.dtype == torch.float32
    for name, g, w, bnd in zip(NAMES[:4], (y, x.grad, a.grad, bm.grad), want, bounds):
        assert_close(g, w, bnd, name)


@needs_kernels
def test_frozen_everything_does_no_weight_work():
    case = make_case(2, 3, 20, 24, torch.float32)
    fisher_a = torch.zeros(R, 20, device=DEVICE)
    fisher_b = torch.zeros(24, R, device=DEVICE)
    a = case["a"].clone().requires_grad_()
    y = multi_lora_linear_triton(case["x"], case["w"], case["b"], a, case["bm"], 1.0, 0.0, 0,
                                 torch.empty(0, dtype=torch.long, device=DEVICE), fisher_a, fisher_b, None)
    y.backward(case["dy"])
    assert (a.grad == 0).all() and (fisher_a == 0).all() and (fisher_b == 0).all()


# --- Tests sized to catch a wrong kernel: several blocks in every dimension, long loops, splits. ---


@needs_kernels
@pytest.mark.parametrize("dtype, shape", [
    (torch.float32, (3, 34, 140, 130)),  # fp32 blocks: down 32x32, up 32x64, per-example 32 wide x 16 tokens
    (torch.float16, (2, 70, 300, 150)),  # 16-bit blocks: down 16x128 (3 column blocks), up 32x64, 64 x 32
], ids=["fp32", "fp16"])
def test_dropout_over_several_blocks_in_both_dimensions(dtype, shape):
    from kernels.lora_configs import pick

    batch, seq, d_in, d_out = shape
    tokens, f32 = batch * seq, dtype == torch.float32
    down, up = pick("lora_down", tokens, f32), pick("lora_up", tokens, f32)
    per_example = pick("per_example_grad", tokens, f32)
    assert tokens >= 2 * max(down["BLOCK_N"], up["BLOCK_N"]) and d_in >= 2 * down["BLOCK_K"]
    assert d_in >= 2 * up["BLOCK_M"] and d_out >= 2 * up["BLOCK_M"] and d_in >= 2 * per_example["BLOCK_D"]
    assert seq >= 2 * per_example["BLOCK_T"]
    check_against_reference(make_case(*shape, dtype, seed=21), dtype, p=0.2, seed=4321, groups=(0, 2, 3))


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 40, 24, 140), (7, None, 33, 19)], ids=["3d", "2d"])
def test_native_16bit_dot_path_under_the_interpreter(monkeypatch, shape):
    """The GPU's native-dtype dot branch (casts, transposes) run by the interpreter in fp16, whose dots
    it computes correctly (bf16 it does not: that is the GPU test)."""
    monkeypatch.setattr(lora_triton, "INTERPRETING", False)
    assert lora_triton.dot_mode(torch.float16)["NATIVE_DOT"]
    check_against_reference(make_case(*shape, torch.float16, seed=61), torch.float16, p=0.2, seed=3)


@needs_kernels
def test_keep_rate_and_lane_independence_on_many_draws():
    p, rows, width = 0.3, 400, 300  # 120 000 draws
    keep = dropout_keep_mask(rows, width, p, 2024, DEVICE).cpu()
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Each of the four Philox lanes, each byte position of the packed mask, and the first and last
    # column blocks keep at the same rate (a wrong lane/bit/offset mapping would skew one of them).
    for part in [keep[:, lane::4] for lane in range(4)] + [keep[:, bit::8] for bit in range(8)] + [
            keep[:, :128], keep[:, 256:]]:
        sd = math.sqrt(p * (1 - p) / part.numel())
        assert abs(part.float().mean().item() - (1 - p)) < 5 * sd
    # Neighbouring elements are independent: P(both kept) = (1-p)^2 within 5 sigma.
    both = (keep[:, :-1] & keep[:, 1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / keep[:, 1:].numel())
    assert not torch.equal(keep[:-1], keep[1:])


@needs_kernels
def test_several_examples_per_split_and_long_token_loops():
    # 9 examples over at most 4 splits (3 per split) of 100 tokens each (7 token blocks of 16).
    check_against_reference(make_case(9, 100, 24, 20, torch.float32, seed=31), torch.float32, p=0.1, seed=5)


@needs_kernels
def test_large_float32_case_against_float64():
    check_against_reference(make_case(3, 64, 384, 320, torch.float32, seed=41), torch.float32, p=0.05, seed=8,
                            groups=(0, 1, 2))


@needs_kernels
@pytest.mark.parametrize("accumulate", [True, False])
def test_lora_up_writes_or_accumulates(accumulate):
    g = torch.Generator().manual_seed(3)
    out0, h = torch.randn(70, 150, generator=g), torch.randn(70, R, generator=g)
    w, bias = torch.randn(150, R, generator=g), torch.randn(150, generator=g)
    keep = torch.rand(70, 150, generator=g) > 0.3
    packed = torch.zeros(70, (150 + 7) // 8, dtype=torch.uint8)
    for j in range(150):
        packed[:, j // 8] |= keep[:, j].to(torch.uint8) << (j % 8)
    assert torch.equal(lora_triton.unpack_keep_bits(packed, 150), keep)
    out = out0.clone().to(DEVICE)
    lora_triton.lora_up_(out, h.to(DEVICE), w.to(DEVICE), 0.5, packed.to(DEVICE), bias.to(DEVICE), accumulate)
    want = (0.5 * h.double() @ w.double().t()) * keep + bias.double() + (out0.double() if accumulate else 0)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)


def pack(case, lengths):
    """The packed (tokens, d) form of a padded case whose rows beyond each length are zero."""
    example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.cat([torch.arange(n) for n in lengths])
    for name in ("x", "dy"):
        valid = torch.zeros(case[name].shape[:2], dtype=torch.bool)
        valid[example, position] = True
        case[name][~valid.to(DEVICE)] = 0
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=DEVICE)
    return case["x"][example, position], case["dy"][example, position], cu, (example, position)


@needs_kernels
@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_packed_batch_with_cu_seqlens_matches_padded_reference(backend, p):
    """Examples given by cu_seqlens (one token, several blocks, empty) get their own Fisher terms."""
    from mage.lora_function import dropout_mask, multi_lora_linear_eager

    lengths = [5, 1, 37, 0, 12]
    case = make_case(len(lengths), max(lengths), 36, 28, torch.float32, seed=51)
    x_packed, dy_packed, cu, where = pack(case, lengths)
    rows, s, seed = group_rows((0, 1, 3)), 0.6, 77
    x = x_packed.clone().requires_grad_()
    a, bm = case["a"].clone().requires_grad_(), case["bm"].clone().requires_grad_()
    fisher_a, fisher_b = torch.zeros(R, 36, device=DEVICE), torch.zeros(28, R, device=DEVICE)
    fn = multi_lora_linear_triton if backend == "triton" else multi_lora_linear_eager
    y = fn(x, case["w"], case["b"], a, bm, s, p, seed, rows.to(DEVICE), fisher_a, fisher_b, case["c"], cu)
    y.backward(dy_packed)
    if p == 0:
        keep_packed = None
    elif backend == "triton":
        keep_packed = dropout_keep_mask(x.shape[0], 36, p, seed, DEVICE)
    else:
        keep_packed = dropout_mask(x.shape, p, seed, DEVICE, torch.float32) != 0
    keep = None
    if keep_packed is not None:
        keep = torch.ones(case["x"].shape, dtype=torch.bool, device=DEVICE)
        keep[where] = keep_packed
    want = reference(case["x"], case["w"], case["b"], case["a"], case["bm"], case["dy"], s, keep, p, rows, case["c"])
    bounds = tolerances(case, s, keep, p, rows, case["c"], torch.float32)
    got = [y.detach(), x.grad, a.grad, bm.grad, fisher_a, fisher_b]
    for i in (0, 1):  # y and dx: compare the real tokens only
        want[i], bounds[i] = want[i][where], bounds[i][where]
    for name, g, w, bnd in zip(NAMES, got, want, bounds):
        assert_close(g, w, bnd, f"{name} packed ({backend}, p={p})")


@needs_kernels
def test_bad_cu_seqlens_get_clear_errors():
    case = make_case(2, 3, 20, 24, torch.float32)
    x2 = case["x"].reshape(-1, 20)
    args = (x2, case["w"], case["b"], case["a"], case["bm"], 1.0, 0.0, 0, group_rows((0,)).to(DEVICE), None, None)
    with pytest.raises(ValueError, match="1-D int32"):
        multi_lora_linear_triton(*args, None, torch.tensor([0, 3, 6], device=DEVICE))
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="end at the number of tokens"):
            multi_lora_linear_triton(*args, None, torch.tensor([0, 3, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="one entry per example"):
        multi_lora_linear_triton(*args, torch.ones(3, device=DEVICE),
                                 torch.tensor([0, 3, 6], dtype=torch.int32, device=DEVICE))


def _relative_errors(got, want):
    return [((g.detach().double().cpu() - w).norm() / w.norm().clamp_min(1e-300)).item() for g, w in zip(got, want)]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 tl.dot is wrong under the Triton interpreter; "
                                                  "this is the GPU test that covers bf16")
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES + [(4, 300, 512, 384)], ids=lambda s: "x".join(str(v) for v in s))
def test_bfloat16_on_gpu(shape, p):
    """bf16 within the elementwise bounds, and no worse than the fp32 path's measured error scaled by
    eps(bf16) / eps(fp32) (the tolerance comes from the fp32 error, not from a fraction of the terms)."""
    case16 = make_case(*shape, torch.bfloat16, seed=1)
    got16 = check_against_reference(case16, torch.bfloat16, p=p, seed=99)
    # The same (bf16-representable) inputs through the fp32 kernels: their error is the kernels' own.
    case32 = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in case16.items()}
    got32 = check_against_reference(case32, torch.float32, p=p, seed=99)
    rows = group_rows(range(GROUPS))
    keep = None
    if p > 0:
        keep = dropout_keep_mask(case16["x"].numel() // case16["x"].shape[-1], case16["x"].shape[-1], p, 99, DEVICE)
    want = reference(case32["x"], case32["w"], case32["b"], case32["a"], case32["bm"], case32["dy"], 0.7, keep, p,
                     rows, case32["c"])
    ratio = EPS[torch.bfloat16] / EPS[torch.float32]
    for name, e16, e32 in zip(NAMES, _relative_errors(got16, want), _relative_errors(got32, want)):
        # y is rounded to bf16 once on output: its error floor is eps(bf16) / 2 whatever fp32 achieves.
        allowed = 8 * ratio * max(e32, EPS[torch.float32]) + EPS[torch.bfloat16]
        assert e16 <= allowed, f"{name}: bf16 relative error {e16:.3e} > {allowed:.3e} (fp32: {e32:.3e})"


def _good_args():
    case = make_case(2, 3, 20, 24, torch.float32)
    return dict(x=case["x"], weight=case["w"], bias=case["b"], lora_A=case["a"], lora_B=case["bm"], scaling=1.0,
                dropout_p=0.0, seed=0, grad_rows=group_rows((0,)).to(DEVICE), fisher_A=None, fisher_B=None,
                example_scale=None)


@pytest.mark.parametrize("change, error, message", [
    (dict(x=torch.zeros(20)), ValueError, "x must be"),
    (dict(weight=torch.zeros(24, 21)), ValueError, "weight must be"),
    (dict(bias=torch.zeros(23)), ValueError, "bias must be"),
    (dict(lora_A=torch.zeros(R, 19)), ValueError, "lora_A must be"),
    (dict(lora_B=torch.zeros(24, R + 1)), ValueError, "lora_B must be"),
    (dict(weight=torch.zeros(24, 20, dtype=torch.float16)), TypeError, "dtype must equal"),
    (dict(lora_A=torch.zeros(R, 20, dtype=torch.int32)), TypeError, "lora_A must be float"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(grad_rows=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "grad_rows"),
    (dict(fisher_A=torch.zeros(R, 20)), ValueError, "both fisher_A and fisher_B"),
    (dict(fisher_A=torch.zeros(R, 20, dtype=torch.float64), fisher_B=torch.zeros(24, R)), TypeError, "float32"),
    (dict(fisher_A=torch.zeros(R, 21), fisher_B=torch.zeros(24, R)), ValueError, "shapes of lora_A"),
    (dict(example_scale=torch.ones(3)), ValueError, "one entry per example"),
])
def test_bad_inputs_get_clear_errors(change, error, message):
    args = _good_args()
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.dtype != torch.float64 else v
                 for k, v in change.items()})
    with pytest.raises(error, match=message):
        multi_lora_linear_triton(**args)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="value checks of grad_rows run on CPU tensors only")
def test_unsorted_grad_rows_rejected_on_cpu():
    args = _good_args()
    args["grad_rows"] = torch.tensor([3, 1])
    with pytest.raises(ValueError, match="sorted, unique"):
        multi_lora_linear_triton(**args)


def test_kernel_suite_in_fresh_process():
    if KERNELS_RUNNABLE:
        pytest.skip("the kernel tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def _load_benchmark():
    from tests.benchmark_modules import load_benchmark

    return load_benchmark("bench_lora4")


def test_benchmark_runs_on_cpu():
    """The benchmark must never be broken: one tiny pass of every provider and the breakdown (no CSV)."""
    bench = _load_benchmark()
    providers = ["base", "cublas", "peft4", "eager"] + (["fused"] if KERNELS_RUNNABLE else [])
    bench.main(["--cpu", "--no-csv", "--reps", "2", "--tokens", "32", "--modes", "fwdbwd", "--providers", *providers]
               + (["--profile"] if KERNELS_RUNNABLE else []))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_benchmark_cublas_provider_computes_the_same_thing(p):
    """The cuBLAS-only provider is a correct implementation (else its time would mean nothing)."""
    from mage.lora_function import multi_lora_linear_eager

    bench = _load_benchmark()
    case = make_case(3, 4, 20, 28, torch.float32, seed=4)
    rows = group_rows((0, 2))
    got = run_fused(case, 0.7, 0.0, 0, rows, None, fn=lambda x, w, b, a, bm, s, p_, seed, r, fa, fb, c:
                    bench.CublasLoRA.apply(x, w, b, a, bm, s, 0.0, r, fa, fb))
    want = run_fused(case, 0.7, 0.0, 0, rows, None, fn=multi_lora_linear_eager)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
    if p:  # with dropout, W = 0: dx is zero exactly where x was dropped, and y used that same mask
        x = case["x"].clone().requires_grad_()
        fa, fb = torch.zeros(R, 20), torch.zeros(28, R)
        y = bench.CublasLoRA.apply(x, torch.zeros_like(case["w"]), None, case["a"], case["bm"], 0.7, p, rows, fa, fb)
        y.backward(case["dy"])
        keep = x.grad != 0
        assert abs((~keep).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / keep.numel())
        want_y = 0.7 * ((case["x"] * keep / (1 - p)) @ case["a"].t()) @ case["bm"].t()
        torch.testing.assert_close(y.detach(), want_y, rtol=1e-5, atol=1e-6)
