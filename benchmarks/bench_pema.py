"""Benchmark the PEMA update ("paper" rule) on the LoRA parameter set of LLaMA-2-13B.

The set: 40 decoder layers x 7 adapted linears (q, k, v, o, gate, up, down) x (A, B) = 560 tensors,
rank 32, hidden 5120, intermediate 13824: about 125M entries. Providers:

- eager_loop:  mage.pema.pema_update_ once per tensor (the reference);
- foreach:     the same math as a torch._foreach_* composition (+ one nan_to_num_ per tensor, as
               _foreach has no select);
- native_op:   mage.ops.pema_update_multi_ (the C++/CUDA op mage::pema_update_);
- public_mage_inverse: the public MAGE code's update as its description reads (per tensor
               alpha = (g + 1) @ inv(Δᵀ (g ⊙ g) + 1e-5 I): a d_in x d_in inverse per module and
               step), timed on one module of each of the 3 shapes of a layer and EXTRAPOLATED to
               the 280 modules. It implements a different rule: time only, no result check.

Each is reported in ms and in GB/s of the bytes the update must move (read ema, param, grad,
fisher; write ema), against a measured device-to-device copy. Rows are appended to
benchmarks/results/pema.csv. On CPU, --scale shrinks the widths (rank stays 32) so it runs in seconds:

    python benchmarks/bench_pema.py                        # GPU if present, else CPU at --scale 0.05
    python benchmarks/bench_pema.py --device cpu --scale 0.05 --threads 1
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from mage.provenance import append_csv_rows, git_commit

from mage.ops import native_available, pema_update_multi_
from mage.pema import pema_update_

HIDDEN, INTERMEDIATE, RANK, LAYERS = 5120, 13824, 32, 40
KW = dict(lam=1e-5, beta_min=0.0, beta_max=1.0)
CSV_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pema.csv")
CSV_FIELDS = ["date", "device", "git_commit", "provider", "ms", "gb_per_s", "pct_of_copy", "tensors", "entries",
              "scale", "layers", "param_dtype", "note"]

Lists = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def module_shapes(scale: float) -> list[tuple[int, int]]:
    """(d_in, d_out) of the 7 adapted linears of one decoder layer, widths scaled."""
    h, i = max(1, round(HIDDEN * scale)), max(1, round(INTERMEDIATE * scale))
    return [(h, h)] * 4 + [(h, i)] * 2 + [(i, h)]


def lora_shapes(scale: float, layers: int) -> list[tuple[int, int]]:
    """A (rank, d_in) and B (d_out, rank) of every module: 2 * 7 * layers tensors."""
    return [s for _ in range(layers) for d_in, d_out in module_shapes(scale) for s in ((RANK, d_in), (d_out, RANK))]


def make_lists(shapes, device, param_dtype, seed=0) -> Lists:
    """Magnitudes as measured in docs/METHOD.md section 4 (|Δ| ~ 1e-4..1e-3, |g| ~ 1e-5, F ~ 1e-9)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    emas, params, grads, fishers = [], [], [], []
    for shape in shapes:
        ema = torch.randn(shape, device=device, generator=gen) * 0.02
        emas.append(ema)
        params.append((ema + torch.randn(shape, device=device, generator=gen) * 5e-4).to(param_dtype))
        grads.append((torch.randn(shape, device=device, generator=gen) * 1e-5).to(param_dtype))
        fishers.append(torch.rand(shape, device=device, generator=gen) * 2e-9)
    return emas, params, grads, fishers


def eager_loop(emas, params, grads, fishers) -> None:
    for e, p, g, f in zip(emas, params, grads, fishers):
        pema_update_(e, p, g, f, mode="paper", **KW)


def foreach_update(emas, params, grads, fishers) -> None:
    p32 = params if params[0].dtype == torch.float32 else [p.float() for p in params]
    g32 = grads if grads[0].dtype == torch.float32 else [g.float() for g in grads]
    denom = torch._foreach_sub(p32, emas)
    hess = torch._foreach_mul(fishers, fishers)
    torch._foreach_add_(hess, KW["lam"])
    torch._foreach_mul_(denom, hess)
    beta = torch._foreach_add(g32, 1.0)
    torch._foreach_div_(beta, denom)
    for b in beta:  # non-finite -> beta_max; _foreach has no select, so one kernel per tensor
        torch.nan_to_num_(b, nan=KW["beta_max"], posinf=KW["beta_max"], neginf=KW["beta_max"])
    torch._foreach_clamp_min_(beta, KW["beta_min"])
    torch._foreach_clamp_max_(beta, KW["beta_max"])
    one_minus = torch._foreach_neg(beta)
    torch._foreach_add_(one_minus, 1.0)
    torch._foreach_mul_(emas, beta)
    torch._foreach_addcmul_(emas, one_minus, p32)


def native_op(emas, params, grads, fishers) -> None:
    pema_update_multi_(emas, params, grads, fishers, mode="paper", **KW)


def public_mage_inverse(ema, param, grad) -> torch.Tensor:
    """One tensor of the public code's update (fp32 here): Δᵀ(g⊙g) is (cols x cols), d_in x d_in for A.

    Returns the new EMA instead of writing it, so repeated timing runs see the same inputs."""
    delta = param.float() - ema
    g = grad.float()
    hess = delta.T @ (g * g)
    hess.diagonal().add_(1e-5)
    alpha = (g + 1.0) @ torch.linalg.inv(hess)
    return ema * alpha + param.float() * (1.0 - alpha)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], None], device: str, warmup: int, iters: int) -> float:
    """Median wall time of fn in ms (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gb_per_s(nbytes: int, device: str, warmup: int, iters: int) -> float:
    """Device-to-device copy bandwidth: bytes read + bytes written per second."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * src.numel() * 4 / ms / 1e6


def check_against_reference(provider, device: str, param_dtype) -> None:
    """A provider must agree with the eager reference (to a few float32 ulps) before it is timed."""
    lists = make_lists(lora_shapes(0.01, 1), device, param_dtype, seed=1)
    want = [e.clone() for e in lists[0]]
    eager_loop(want, *lists[1:])
    got = [e.clone() for e in lists[0]]
    provider(got, *lists[1:])
    eps = torch.finfo(torch.float32).eps
    for g, w, e0, p in zip(got, want, lists[0], lists[1]):
        bound = 4 * eps * (e0.abs() + p.float().abs())
        if not ((g - w).abs() <= bound).all():
            raise AssertionError(f"{provider.__name__} disagrees with mage.pema.pema_update_")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()} x{torch.get_num_threads()} threads"




def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--scale", type=float, default=None,
                        help="width factor on hidden/intermediate (default 1.0 on cuda, 0.05 on cpu)")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of params and grads (ema and fisher stay float32)")
    parser.add_argument("--iters", type=int, default=None, help="timed repetitions (default 20 cuda, 3 cpu)")
    parser.add_argument("--csv", default=CSV_PATH, help="file the rows are appended to ('' for none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default 1 on cpu: on a shared machine threads waiting for a "
                             "descheduled sibling turn timings into noise)")
    args = parser.parse_args(argv)
    device = args.device
    if args.threads or device == "cpu":
        torch.set_num_threads(args.threads or 1)
    scale = args.scale if args.scale is not None else (1.0 if device == "cuda" else 0.05)
    iters = args.iters if args.iters is not None else (20 if device == "cuda" else 3)
    warmup = 3 if device == "cuda" else 1
    param_dtype = getattr(torch, args.param_dtype)

    shapes = lora_shapes(scale, args.layers)
    lists = make_lists(shapes, device, param_dtype)
    entries = sum(e.numel() for e in lists[0])
    pbytes = torch.finfo(param_dtype).bits // 8
    update_bytes = entries * (4 + pbytes + pbytes + 4 + 4)  # read ema, param, grad, fisher; write ema
    copy_bw = copy_gb_per_s(max(update_bytes // 2, 1 << 20), device, warmup, iters)
    print(f"{len(shapes)} tensors, {entries / 1e6:.1f}M entries, {update_bytes / 1e9:.2f} GB per update; "
          f"{device_name(device)}: copy {copy_bw:.1f} GB/s")

    rows = []

    def record(provider: str, ms: float, note: str) -> None:
        gbps = update_bytes / ms / 1e6
        rows.append(dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         device=device_name(device), git_commit=git_commit(), provider=provider, ms=f"{ms:.3f}",
                         gb_per_s=f"{gbps:.1f}", pct_of_copy=f"{100 * gbps / copy_bw:.1f}", tensors=len(shapes),
                         entries=entries, scale=scale, layers=args.layers, param_dtype=args.param_dtype, note=note))
        print(f"  {provider:<22} {ms:10.3f} ms {gbps:8.1f} GB/s {100 * gbps / copy_bw:6.1f}% of copy  {note}")

    record("copy", update_bytes / copy_bw / 1e6, "the same bytes at measured copy bandwidth")
    providers = [(eager_loop, ""), (foreach_update, "")]
    if native_available(device):
        providers.append((native_op, ""))
    else:
        print(f"  native_op: skipped, mage._C has no {device} kernel")
    for fn, note in providers:
        check_against_reference(fn, device, param_dtype)
        record(fn.__name__, time_ms(lambda: fn(*lists), device, warmup, iters), note)

    # The public code's rule: one module per distinct shape, extrapolated to all 7 * layers modules.
    per_layer_ms = 0.0
    for d_in, d_out in module_shapes(scale):
        a_b = make_lists([(RANK, d_in), (d_out, RANK)], device, param_dtype, seed=2)
        per_layer_ms += time_ms(lambda: [public_mage_inverse(e, p, g) for e, p, g in zip(*a_b[:3])], device,
                                warmup, max(1, iters // 3))
    record("public_mage_inverse", per_layer_ms * args.layers,
           f"EXTRAPOLATED: 7 modules of one layer timed, x{args.layers} layers")

    if args.csv:
        append_csv_rows(args.csv, CSV_FIELDS, rows)
        print(f"appended {len(rows)} rows to {args.csv}")
    return rows


if __name__ == "__main__":
    main()
