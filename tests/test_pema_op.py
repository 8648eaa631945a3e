"""The native multi-tensor PEMA op (mage::pema_update_, csrc/) against the eager reference mage.pema.pema_update_.

Both compute in float32 with one rounding per operation in the same order (the build turns FP
contraction off), so the allowed difference is one float32 ulp of the magnitudes in the final sum
beta*ema + (1-beta)*param: eps * (|ema| + |param|) elementwise.
"""
import os
import shutil
import subprocess
import warnings

import pytest
import torch

import mage.ops
from mage.ops import native_available, pema_update_multi_
from mage.pema import pema_beta, pema_update_

EPS32 = torch.finfo(torch.float32).eps
MODES = ("paper", "taylor", "fixed", "fisher")
# (param dtype, grad dtype): bfloat16 params and grads are upcast to float32 before the math.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
# Empty, single entries, sizes that are no multiple of the vector width, and one spanning several
# CPU work chunks (2^15 elements).
SHAPES = [(0,), (1,), (3, 5), (7, 1, 3), (0, 4), (33,), (129, 17), (70_001,)]
# "measured": the magnitudes of docs/METHOD.md section 4 (beta is almost always clamped to 0 or 1);
# "mid": magnitudes and scalars for which most betas land strictly inside the clamp range.
SCALES = {
    "measured": dict(ema=0.02, delta=5e-4, grad=1e-5, fisher=2e-9,
                     kw=dict(lam=1e-5, beta_min=0.0, beta_max=1.0, fixed_beta=0.99)),
    "mid": dict(ema=1.0, delta=2.0, grad=1.0, fisher=2.0,
                kw=dict(lam=0.5, beta_min=0.05, beta_max=0.95, fixed_beta=0.9)),
}

requires_native_cpu = pytest.mark.skipif(not native_available("cpu"),
                                         reason="mage._C not built; test_extension_is_built fails for it")


def make_group(shape, param_dtype, grad_dtype, scale, gen, device="cpu"):
    """(ema, param, grad, fisher, fisher_prev) with Δ of both signs and the special entries the rules
    treat apart: Δ = 0 (division by zero), F = 0, F = F_prev = 0 (w = 0) and g = -1 (paper numerator 0)."""
    s = SCALES[scale]

    def randn(std):
        return torch.randn(shape, generator=gen) * std

    ema = randn(s["ema"])
    param = (ema + randn(s["delta"])).to(param_dtype)
    grad = randn(s["grad"])
    fisher = torch.rand(shape, generator=gen) * s["fisher"]
    prev = torch.rand(shape, generator=gen) * s["fisher"]
    pick = torch.rand(shape, generator=gen)
    ema = torch.where(pick < 0.1, param.float(), ema)  # Δ = 0 exactly, also for bfloat16 params
    fisher[(pick >= 0.1) & (pick < 0.3)] = 0.0
    prev[(pick >= 0.2) & (pick < 0.3)] = 0.0
    grad[(pick >= 0.3) & (pick < 0.35)] = -1.0
    return [t.to(device) for t in (ema, param, grad.to(grad_dtype), fisher, prev)]


def make_lists(shapes, param_dtype, grad_dtype, scale, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    groups = [make_group(s, param_dtype, grad_dtype, scale, gen, device) for s in shapes]
    return [list(column) for column in zip(*groups)]


def reference(emas, params, grads, fishers, prevs, mode, kw):
    out = [e.clone() for e in emas]
    for e, p, g, f, fp in zip(out, params, grads, fishers, prevs):
        pema_update_(e, p, g, f, mode=mode, fisher_prev=fp, **kw)
    return out


def assert_within_one_ulp(out, ref, ema0, param):
    bound = EPS32 * (ema0.abs() + param.float().abs())
    err = (out - ref).abs()
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"max error {err.max().item():.3g} exceeds one ulp ({bound.max().item():.3g})"


def check_against_reference(mode, param_dtype, grad_dtype, scale, shapes, device, seed=0):
    emas, params, grads, fishers, prevs = make_lists(shapes, param_dtype, grad_dtype, scale, seed, device)
    kw = SCALES[scale]["kw"]
    want = reference(emas, params, grads, fishers, prevs, mode, kw)
    got = [e.clone() for e in emas]
    pema_update_multi_(got, params, grads, fishers, mode=mode, fisher_prevs=prevs, **kw)
    for g, w, e0, p in zip(got, want, emas, params):
        assert_within_one_ulp(g, w, e0, p)
    return emas, params, grads, fishers, prevs


def test_extension_is_built():
    if os.environ.get("MAGE_SKIP_EXT") == "1":
        pytest.skip("MAGE_SKIP_EXT=1: the native op was not built on purpose (test_fallback_* cover that path)")
    assert mage.ops.NATIVE_LOADED, mage.ops._IMPORT_ERROR
    assert native_available("cpu")


def test_cuda_kernel_compiled_when_nvcc_present():
    if os.environ.get("MAGE_SKIP_EXT") == "1" or os.environ.get("MAGE_SKIP_CUDA_BUILD") == "1":
        pytest.skip("native CUDA build switched off by MAGE_SKIP_EXT / MAGE_SKIP_CUDA_BUILD")
    nvcc = shutil.which("nvcc")
    if nvcc is None or torch.version.cuda is None:
        pytest.skip("no nvcc or a CPU build of torch: setup.py builds the CPU op only")
    release = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    if f"release {torch.version.cuda.split('.')[0]}." not in release:
        pytest.skip("nvcc's CUDA major version differs from torch's: setup.py builds the CPU op only")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mage::pema_update_", "CUDA")
    assert native_available("cuda")


@requires_native_cpu
@pytest.mark.parametrize("scale", sorted(SCALES))
@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cpu_matches_reference(mode, param_dtype, grad_dtype, scale):
    emas, params, grads, fishers, prevs = check_against_reference(mode, param_dtype, grad_dtype, scale, SHAPES, "cpu")
    if scale == "mid" and mode != "fixed":
        # The comparison is only worth something if beta is not always at a clamp bound.
        kw = SCALES[scale]["kw"]
        beta = torch.cat([pema_beta(p.float() - e, g.float(), f, mode=mode, fisher_prev=fp, **kw).flatten()
                          for e, p, g, f, fp in zip(emas, params, grads, fishers, prevs)])
        inside = ((beta > kw["beta_min"]) & (beta < kw["beta_max"])).float().mean().item()
        assert inside > 0.1, f"only {inside:.1%} of betas inside the clamp range"


@requires_native_cpu
def test_many_tensors_of_odd_sizes():
    gen = torch.Generator().manual_seed(1)
    shapes = [(int(n),) for n in torch.randint(0, 5000, (300,), generator=gen)]
    for mode in MODES:
        check_against_reference(mode, torch.float32, torch.float32, "mid", shapes, "cpu", seed=2)


# Single entries worked by hand from docs/METHOD.md section 4: (mode, ema, param, grad, fisher, fisher_prev, kwargs, expected).
HAND_CASES = [
    # H = F*F + lam = 2, g + 1 = 2 -> beta = 1/Δ = 0.25 -> 0.25*0 + 0.75*4
    ("paper", 0.0, 4.0, 1.0, 1.0, 0.0, dict(lam=1.0), 3.0),
    # Δ*H underflows to a tiny negative number: beta = -inf must become beta_max, not beta_min
    ("paper", 0.0, -1e-30, 0.0, 0.0, 0.0, dict(lam=1e-10, beta_min=0.25, beta_max=0.75), 0.25 * -1e-30),
    # g / (Δ * (F + lam)) = 0.5 / 2 = 0.25 -> 0.75 * 2
    ("taylor", 0.0, 2.0, 0.5, 0.0, 0.0, dict(lam=1.0), 1.5),
    # beta = 2 is clamped to beta_max = 0.5
    ("taylor", 0.0, 1.0, 2.0, 0.0, 0.0, dict(lam=1.0, beta_max=0.5), 0.5),
    ("fixed", 2.0, 4.0, 0.0, 0.0, 0.0, dict(fixed_beta=0.5), 3.0),
    # w = 3 / (3 + 1) = 0.75 -> beta = 0.5 + 0.5 * 0.75 = 0.875 -> 0.125 * 8
    ("fisher", 0.0, 8.0, 0.0, 1.0, 3.0, dict(fixed_beta=0.5), 1.0),
    # both Fishers 0: w = 0 -> beta = fixed_beta
    ("fisher", 0.0, 8.0, 0.0, 0.0, 0.0, dict(fixed_beta=0.5), 4.0),
]


@requires_native_cpu
@pytest.mark.parametrize("case", HAND_CASES, ids=lambda c: f"{c[0]}-{c[-1]:g}")
def test_hand_computed_values(case):
    mode, ema, param, grad, fisher, prev, kw, expected = case
    out, p, g, f, fp = (torch.tensor([v], dtype=torch.float32) for v in (ema, param, grad, fisher, prev))
    pema_update_multi_([out], [p], [g], [f], mode=mode, fisher_prevs=[fp], **kw)
    want = torch.tensor([expected], dtype=torch.float32)
    assert_within_one_ulp(out, want, torch.tensor([ema]), p)


@requires_native_cpu
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    emas, params, grads, fishers, prevs = make_lists([(5, 3), (0,), (17,)], torch.bfloat16, torch.float32, "mid")
    kw = SCALES["mid"]["kw"]
    torch.library.opcheck(
        torch.ops.mage.pema_update_.default,
        (emas, params, grads, fishers, prevs if mode == "fisher" else None, mode, kw["lam"], kw["beta_min"],
         kw["beta_max"], kw["fixed_beta"]),
    )


@requires_native_cpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_torch_compile(backend):
    emas, params, grads, fishers, prevs = make_lists([(4, 6), (9,)], torch.float32, torch.float32, "mid")
    kw = SCALES["mid"]["kw"]
    want = reference(emas, params, grads, fishers, prevs, "fisher", kw)

    @torch.compile(backend=backend, fullgraph=True)
    def step(e, p, g, f, fp):
        pema_update_multi_(e, p, g, f, mode="fisher", fisher_prevs=fp, **kw)

    got = [e.clone() for e in emas]
    step(got, params, grads, fishers, prevs)
    for g, w, e0, p in zip(got, want, emas, params):
        assert_within_one_ulp(g, w, e0, p)


@requires_native_cpu
def test_empty_lists_and_params_that_require_grad():
    pema_update_multi_([], [], [], [])  # nothing to do, no error
    ema = torch.randn(6)
    param = torch.nn.Parameter(ema + 1.0)  # the trainer passes live parameters
    want = ema.clone()
    pema_update_(want, param, torch.zeros(6), torch.zeros(6), mode="fixed")
    pema_update_multi_([ema], [param], [torch.zeros(6)], [torch.zeros(6)], mode="fixed")
    assert_within_one_ulp(ema, want, want, param)


def _bad_inputs():
    def lists(n=2, **over):
        emas, params, grads, fishers, _ = make_lists([(4, 3)] * n, torch.float32, torch.float32, "mid")
        args = dict(emas=emas, params=params, grads=grads, fishers=fishers)
        args.update(over)
        return args

    base = make_lists([(4, 3)], torch.float32, torch.float32, "mid")
    return [
        ("ema dtype", dict(lists(), emas=[torch.zeros(4, 3, dtype=torch.float64)] * 2), {},
         r"emas\[0\] has dtype Double.*float32"),
        ("param shape", dict(lists(), params=[torch.zeros(4, 3), torch.zeros(3, 4)]), {},
         r"params\[1\] has shape \[3, 4\] but emas\[1\] has shape \[4, 3\]"),
        ("list length", dict(lists(), grads=base[2]), {}, r"got 2 emas but 1 grads"),
        ("unknown mode", lists(), dict(mode="ema"), r"unknown mode 'ema'.*paper"),
        ("non-contiguous param", dict(lists(), params=[torch.zeros(3, 4).t()] * 2), {},
         r"params\[0\] is not contiguous.*contiguous\(\)"),
        ("non-contiguous ema", dict(lists(), emas=[torch.zeros(3, 4).t()] * 2), {},
         r"emas\[0\] is not contiguous.*in place"),
        ("fisher dtype", dict(lists(), fishers=[torch.zeros(4, 3, dtype=torch.bfloat16)] * 2), {},
         r"fishers\[0\] has dtype BFloat16.*float32"),
        ("param dtype", dict(lists(), params=[torch.zeros(4, 3, dtype=torch.float16)] * 2), {},
         r"params\[0\] has dtype Half.*float32 or bfloat16"),
        ("ema aliases param", dict(lists(n=1), params=[base[0][0]], emas=[base[0][0]]), {},
         r"params\[0\] shares memory with emas\[0\]"),
        ("fisher without prevs", lists(), dict(mode="fisher"), r"mode 'fisher' needs fisher_prevs"),
        ("clamp range", lists(), dict(beta_min=0.9, beta_max=0.1), r"beta_min \(0.9\) is larger than beta_max"),
    ]


@requires_native_cpu
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_rejected(case):
    _, args, kwargs, message = case
    with pytest.raises(RuntimeError, match=message):
        pema_update_multi_(args["emas"], args["params"], args["grads"], args["fishers"], **kwargs)


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(mage.ops, "NATIVE_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(mage.ops, "_fallback_warned", False)
    emas, params, grads, fishers, prevs = make_lists([(5,), (2, 3)], torch.bfloat16, torch.bfloat16, "mid")
    kw = SCALES["mid"]["kw"]
    want = reference(emas, params, grads, fishers, prevs, "paper", kw)
    got = [e.clone() for e in emas]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pema_update_multi_(got, params, grads, fishers, mode="paper", **kw)
        pema_update_multi_([e.clone() for e in emas], params, grads, fishers, mode="paper", **kw)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "falling back" in messages[0], messages
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # the fallback is the reference itself
    with pytest.raises(ValueError, match="got 2 emas but 1 fishers"):
        pema_update_multi_(got, params, grads, fishers[:1])


# ---------------------------------------------------------------------------------------------
# CUDA: these run only on a machine with a GPU (tests/conftest.py skips `gpu` tests elsewhere).


def require_cuda_kernel():
    # Without it pema_update_multi_ would fall back to the eager loop and the tests below would
    # compare the reference with itself.
    assert native_available("cuda"), "mage._C has no CUDA kernel: rebuild with nvcc present (see setup.py)"


@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype,grad_dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_reference(mode, param_dtype, grad_dtype):
    require_cuda_kernel()
    for scale in SCALES:
        check_against_reference(mode, param_dtype, grad_dtype, scale, SHAPES, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_cuda_multi_launch_and_misaligned(param_dtype):
    """More tensors than one launch holds (32), one tensor larger than one launch's 448 chunks of
    2^14 (csrc/cuda/pema.cu), and views starting off the vector boundary (the scalar path)."""
    require_cuda_kernel()
    gen = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 3 * 2 ** 14, (80,), generator=gen)]
    shapes.insert(40, (448 * 2 ** 14 + 12_345,))
    for mode in ("paper", "fisher"):
        check_against_reference(mode, param_dtype, param_dtype, "mid", shapes, "cuda", seed=4)
    emas, params, grads, fishers, prevs = make_lists([(1001,), (77,)], param_dtype, param_dtype, "mid", 5, "cuda")

    def shifted(t):  # same values, data pointer one element past an aligned allocation
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        buf[1:].copy_(t.flatten())
        return buf[1:].view(t.shape)

    kw = SCALES["mid"]["kw"]
    want = reference(emas, params, grads, fishers, prevs, "taylor", kw)
    for shift_ema in (True, False):  # every pointer off, or only the params
        got = [shifted(e) if shift_ema else e.clone() for e in emas]
        pema_update_multi_(got, [shifted(p) for p in params], grads, fishers, mode="taylor", **kw)
        for g, w, e0, p in zip(got, want, emas, params):
            assert_within_one_ulp(g, w, e0, p)


@pytest.mark.gpu
def test_cuda_rejects_mixed_devices():
    require_cuda_kernel()
    emas, params, grads, fishers, _ = make_lists([(8,)], torch.float32, torch.float32, "mid", 7, "cuda")
    with pytest.raises(RuntimeError, match=r"params\[0\] is on cpu but emas\[0\] is on cuda"):
        pema_update_multi_(emas, [params[0].cpu()], grads, fishers)


@pytest.mark.gpu
def test_cuda_graph_capture_uses_current_stream():
    require_cuda_kernel()
    emas, params, grads, fishers, prevs = make_lists([(333,), (4, 50)], torch.float32, torch.float32, "mid", 6,
                                                     "cuda")
    kw = SCALES["mid"]["kw"]
    want = reference(emas, params, grads, fishers, prevs, "paper", kw)
    got = [e.clone() for e in emas]
    start = [e.clone() for e in emas]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture fails if the op launches on another stream
        pema_update_multi_(got, params, grads, fishers, mode="paper", **kw)
    for g, s in zip(got, start):
        g.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    for g, w, e0, p in zip(got, want, emas, params):
        assert_within_one_ulp(g, w, e0, p)
