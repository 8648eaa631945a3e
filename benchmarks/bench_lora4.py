"""Benchmark the four-group LoRA linear (4 x rank 8) with per-example Fisher.

    python benchmarks/bench_lora4.py                 # CUDA: LLaMA-2-13B shapes, bf16
    python benchmarks/bench_lora4.py --profile       # + per-kernel breakdown of the fused path (GB/s)
    python benchmarks/bench_lora4.py --cpu           # small float32 shapes (Triton interpreter), < 1 minute

Providers:
  base    the frozen GEMMs alone (x W^T + b forward, dy W backward): the floor any LoRA path sits on
  cublas  every product by cuBLAS: the LoRA terms added with beta=1 (addmm_), per-example gradients
          as batched GEMMs (bmm) and the Fisher as their squares; the near-term target (unsloth-style)
  peft4   four separate rank-8 adapters (PEFT style) plus a per-example Fisher by einsum in a hook on dy
  eager   mage.lora_function.multi_lora_linear_eager (stacked rank 32, batched einsum Fisher)
  fused   kernels.multi_lora_linear.multi_lora_linear_triton
Modes: fwd, bwd (backward of a retained graph), fwdbwd. Three of the four groups train (tasks with
text+image input and text output), dropout 0.05, Fisher on. Gradients are returned by
torch.autograd.grad, never accumulated into .grad, so no provider pays for an extra read-modify-write.

The model column: the bytes and FLOPs of each kernel a provider launches (docs/KERNELS.md), each
kernel costing max(bytes / copy bandwidth, FLOPs / GEMM rate) at this device's MEASURED copy bandwidth
and bf16 GEMM rate (both printed). It says how far each measured time is from what its own kernels
could reach (base, cublas and fused; eager and peft4 are many small PyTorch ops, measured only);
"floor" is the fused design's minimum (two base GEMMs plus reading x and dy once more).
Rows (with the device's name) are appended to benchmarks/results/lora4.csv; --profile rows to
benchmarks/results/lora4_profile.csv. CPU rows are smoke runs, not performance claims.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# Measure this checkout (the commit written to the CSV), not whichever copy of the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mage.provenance import append_csv_rows, git_commit  # noqa: E402

if not torch.cuda.is_available() or "--cpu" in sys.argv:
    # The fused kernels need the interpreter on CPU; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

RANK, GROUPS, TRAINED_GROUPS = 8, 4, (0, 1, 2)
R = RANK * GROUPS
R_TRAINED = RANK * len(TRAINED_GROUPS)
DROPOUT, SCALING = 0.05, 1.0
LLAMA_13B_SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]  # (d_in, d_out): attention, gate/up, down
CPU_SHAPES = [(64, 96), (96, 64)]
RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "lora4.csv"
PROFILE_CSV_PATH = RESULTS / "lora4_profile.csv"
CSV_FIELDS = ["device", "date", "commit", "d_in", "d_out", "tokens", "seq", "dtype", "provider", "mode",
              "median_ms", "p20_ms", "p80_ms", "peak_mb", "model_ms"]
PROFILE_FIELDS = ["device", "date", "commit", "d_in", "d_out", "tokens", "seq", "dtype", "kernel", "median_ms",
                  "model_mb", "model_gflop", "achieved_gb_s", "pct_of_copy", "model_ms"]


class Layer:
    """One adapted linear layer's tensors, and the providers that run it."""

    def __init__(self, d_in: int, d_out: int, tokens: int, seq: int, dtype: torch.dtype, device: torch.device):
        g = torch.Generator(device=device).manual_seed(0)
        randn = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
        self.seq = seq
        self.x = randn(tokens // seq, seq, d_in).requires_grad_()
        self.dy = randn(tokens // seq, seq, d_out)
        self.weight = randn(d_out, d_in) / d_in ** 0.5
        self.bias = randn(d_out)
        self.a_groups = [(randn(RANK, d_in) * 0.01).requires_grad_(g_ in TRAINED_GROUPS) for g_ in range(GROUPS)]
        self.b_groups = [(randn(d_out, RANK) * 0.01).requires_grad_(g_ in TRAINED_GROUPS) for g_ in range(GROUPS)]
        self.grad_rows = torch.tensor([g_ * RANK + i for g_ in TRAINED_GROUPS for i in range(RANK)], device=device)
        self.fisher_a = torch.zeros(R, d_in, device=device)
        self.fisher_b = torch.zeros(d_out, R, device=device)
        self.seed = 1234

    def trainables(self) -> list[torch.Tensor]:
        return [t for t in self.a_groups + self.b_groups if t.requires_grad]

    def base(self) -> torch.Tensor:
        return torch.nn.functional.linear(self.x, self.weight, self.bias)

    def stacked(self, fn: Callable) -> torch.Tensor:
        lora_a, lora_b = torch.cat(self.a_groups), torch.cat(self.b_groups, dim=1)
        return fn(self.x, self.weight, self.bias, lora_a, lora_b, SCALING, DROPOUT, self.seed, self.grad_rows,
                  self.fisher_a, self.fisher_b, None)

    def cublas(self) -> torch.Tensor:
        lora_a, lora_b = torch.cat(self.a_groups), torch.cat(self.b_groups, dim=1)
        return CublasLoRA.apply(self.x, self.weight, self.bias, lora_a, lora_b, SCALING, DROPOUT, self.grad_rows,
                                self.fisher_a, self.fisher_b)

    def peft4(self) -> torch.Tensor:
        """Four adapters as separate modules would run them; a hook on each adapter output's gradient
        forms the per-example gradients with einsum and accumulates their squares."""
        x_drop = torch.nn.functional.dropout(self.x, DROPOUT)
        y = self.base()
        for g_, (a, b) in enumerate(zip(self.a_groups, self.b_groups)):
            h = x_drop @ a.t()
            out = SCALING * (h @ b.t())
            if g_ in TRAINED_GROUPS:
                rows = slice(g_ * RANK, (g_ + 1) * RANK)
                out.register_hook(self._fisher_hook(x_drop.detach(), h.detach(), b.detach(), rows))
            y = y + out
        return y

    def _fisher_hook(self, x_drop, h, b, rows):
        def hook(dy):
            dy32 = dy.float()
            g_b = SCALING * torch.einsum("bto,btr->bor", dy32, h.float())
            g_a = SCALING * torch.einsum("btr,bti->bri", dy32 @ b.float(), x_drop.float())
            self.fisher_b[:, rows] += g_b.square().sum(0)
            self.fisher_a[rows] += g_a.square().sum(0)
        return hook


class CublasLoRA(torch.autograd.Function):
    """Stacked LoRA + per-example Fisher with cuBLAS products only (the near-term target).

    forward: y = addmm(b, x, W^T), then y.addmm_(drop(x) A^T, B^T) with beta=1 (no separate add pass);
    backward: dx = dy W, then dx += s (dy B) A [* mask]; per-example G_n by bmm over (example, token).
    The dropped x and the mask are materialised (what cuBLAS needs); the per-example bmm outputs are in
    the input dtype and squared in float32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p, rows, fisher_a, fisher_b):
        d_out, d_in = weight.shape
        x2 = x.reshape(-1, d_in)
        keep = torch.empty_like(x2).bernoulli_(1.0 - p) if p > 0 else None
        x_drop = x2 * keep / (1.0 - p) if p > 0 else x2
        h = x_drop @ lora_a.t()
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x_drop, keep, h, weight, lora_a, lora_b, rows)
        ctx.fisher = (fisher_a, fisher_b)
        ctx.scaling, ctx.p, ctx.x_shape = scaling, p, x.shape
        return y.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, dy):
        x_drop, keep, h, weight, lora_a, lora_b, rows = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        d_out, d_in = weight.shape
        examples, seq = (ctx.x_shape[0], ctx.x_shape[1]) if len(ctx.x_shape) == 3 else (ctx.x_shape[0], 1)
        dy2 = dy.reshape(-1, d_out)
        g = dy2 @ lora_b
        dx = dy2 @ weight
        if keep is None:
            dx.addmm_(g, lora_a, alpha=s)
        else:
            dx.addcmul_(g @ lora_a, keep, value=s / (1.0 - p))
        r_sel = rows.numel()
        g_b = s * torch.bmm(dy2.view(examples, seq, d_out).transpose(1, 2), h[:, rows].view(examples, seq, r_sel))
        g_a = s * torch.bmm(g[:, rows].view(examples, seq, r_sel).transpose(1, 2), x_drop.view(examples, seq, d_in))
        g_b, g_a = g_b.float(), g_a.float()
        d_a, d_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
        d_a[rows] = g_a.sum(0).to(d_a.dtype)
        d_b[:, rows] = g_b.sum(0).to(d_b.dtype)
        fisher_a, fisher_b = ctx.fisher
        fisher_a.index_add_(0, rows, g_a.square().sum(0))
        fisher_b.index_add_(1, rows, g_b.square().sum(0))
        return dx.view(ctx.x_shape), None, None, d_a, d_b, None, None, None, None, None


def providers(layer: Layer, include_fused: bool) -> dict[str, Callable[[], torch.Tensor]]:
    from mage.lora_function import multi_lora_linear_eager

    table = {"base": layer.base, "cublas": layer.cublas, "peft4": layer.peft4,
             "eager": lambda: layer.stacked(multi_lora_linear_eager)}
    if include_fused:
        from kernels.multi_lora_linear import multi_lora_linear_triton

        table["fused"] = lambda: layer.stacked(multi_lora_linear_triton)
    return table


def step(layer: Layer, name: str, forward: Callable[[], torch.Tensor], mode: str) -> Callable[[], object]:
    """The callable to time for one mode (bwd replays the backward of one retained graph).

    Gradients come back from torch.autograd.grad instead of accumulating into .grad: accumulation
    would add a read-modify-write of dx (as large as x) to every call but the first.
    """
    inputs = [layer.x] + ([] if name == "base" else layer.trainables())
    if mode == "fwd":
        return lambda: forward()
    if mode == "fwdbwd":
        return lambda: torch.autograd.grad(forward(), inputs, layer.dy)
    y = forward()
    return lambda: torch.autograd.grad(y, inputs, layer.dy, retain_graph=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up (interpreter rewrites, allocator)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    deciles = statistics.quantiles(times, n=10)
    return statistics.median(times), deciles[1], deciles[7]


def peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory one call adds on top of what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure_rates(device: torch.device, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, GEMM rate in FLOP/s) measured on this device."""
    n = (256 if device.type == "cuda" else 4) * 2**20 // dtype.itemsize
    src = torch.randn(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, reps)[0]
    m, k, n_ = (8192, 5120, 5120) if device.type == "cuda" else (256, 256, 256)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n_, device=device, dtype=dtype)
    gemm_ms = time_ms(lambda: a @ b, device, reps)[0]
    return 2 * src.numel() * dtype.itemsize / (copy_ms / 1e3), 2 * m * k * n_ / (gemm_ms / 1e3)


# --- The bytes-and-FLOPs model (docs/KERNELS.md). Each entry: (kernel, bytes, FLOPs). ---------------
# N tokens, K = d_in, M = d_out, e bytes per activation element, R stacked rank, Rt trained rank.

def base_kernels(n, k, m, e, mode):
    fwd = [("base_gemm x W^T", (n * k + k * m + n * m) * e, 2 * n * k * m)]
    bwd = [("base_gemm dy W", (n * m + m * k + n * k) * e, 2 * n * k * m)]
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def fused_kernels(n, k, m, e, mode, p=DROPOUT):
    """The fused path's launches. The LoRA output term is written first and the base GEMM adds into it
    with beta = 1: that GEMM also reads its C (counted), hidden behind its FLOPs when compute-bound."""
    bits = n * k // 8 if p > 0 else 0
    fwd = [("lora_down drop(x) A^T", n * k * e + R * k * e + 4 * n * R + bits, 2 * n * k * R),
           ("lora_up y = b + s h B^T", n * m * e + 4 * n * R + m * R * e, 2 * n * m * R),
           ("base_gemm y += x W^T", (n * k + k * m + 2 * n * m) * e, 2 * n * k * m)]
    bwd = [("lora_down g = dy B", n * m * e + m * R * e + 4 * n * R, 2 * n * m * R),
           ("lora_up dx = s g A * keep", n * k * e + bits + 4 * n * R + k * R * e, 2 * n * k * R),
           ("base_gemm dx += dy W", (n * m + m * k + 2 * n * k) * e, 2 * n * k * m),
           ("per_example dB + Fisher", n * m * e + 4 * n * R, 4 * n * m * R_TRAINED),
           ("per_example dA + Fisher", n * k * e + bits + 4 * n * R, 4 * n * k * R_TRAINED)]
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def cublas_kernels(n, k, m, e, mode, p=DROPOUT):
    drop = [("dropout x -> x_drop, keep", n * k * e * 3, 0)] if p > 0 else []
    fwd = drop + [("gemm h = x_drop A^T", n * k * e + n * R * e, 2 * n * k * R),
                  ("base_gemm x W^T", (n * k + k * m + n * m) * e, 2 * n * k * m),
                  ("addmm_ y += s h B^T (beta 1)", 2 * n * m * e + n * R * e, 2 * n * m * R)]
    lora_dx = ([("gemm g A", n * k * e, 2 * n * k * R), ("addcmul_ dx += s gA * keep", 4 * n * k * e, 0)]
               if p > 0 else [("addmm_ dx += s g A (beta 1)", 2 * n * k * e, 2 * n * k * R)])
    bwd = [("gemm g = dy B", n * m * e + n * R * e, 2 * n * m * R),
           ("base_gemm dy W", (n * m + m * k + n * k) * e, 2 * n * k * m)] + lora_dx + [
           ("bmm per-example dB", n * m * e, 2 * n * m * R_TRAINED),
           ("bmm per-example dA", n * k * e, 2 * n * k * R_TRAINED)]
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def floor_kernels(n, k, m, e, mode):
    """The fused design's floor: the base GEMMs plus one more read of x (forward, for h) and of x and dy
    (backward, for the per-example gradients); the rank-R FLOPs ride on the GEMMs' time."""
    extra = {"fwd": n * k * e, "bwd": (n * k + n * m) * e}
    extra["fwdbwd"] = extra["fwd"] + extra["bwd"]
    return base_kernels(n, k, m, e, mode) + [("extra reads", extra[mode], 0)]


MODELS = {"base": base_kernels, "fused": fused_kernels, "cublas": cublas_kernels}


def model_ms(kernels, bandwidth: float, gemm_rate: float) -> float:
    return sum(max(b / bandwidth, f / gemm_rate) for _, b, f in kernels) * 1e3


def profile_fused(layer: Layer, device: torch.device, reps: int, bandwidth: float, gemm_rate: float):
    """Time each launch of the fused path on its own; yields (kernel, median ms, model entry)."""
    from kernels import lora_triton as kt

    x2 = layer.x.detach().reshape(-1, layer.x.shape[-1])
    dy2 = layer.dy.reshape(-1, layer.dy.shape[-1])
    lora_a = torch.cat(layer.a_groups).detach()
    lora_b = torch.cat(layer.b_groups, dim=1).detach()
    h, mask = kt.lora_down(x2, lora_a, DROPOUT, layer.seed)
    g, _ = kt.lora_down(dy2, lora_b.t())
    y = torch.empty(x2.shape[0], dy2.shape[1], device=device, dtype=x2.dtype)
    dx = torch.empty_like(x2)
    rows, t = layer.grad_rows, layer.seq
    s_x = SCALING / (1 - DROPOUT)
    calls = [lambda: kt.lora_down(x2, lora_a, DROPOUT, layer.seed),
             lambda: kt.lora_up_(y, h, lora_b, SCALING, bias=layer.bias, accumulate=False),
             lambda: y.addmm_(x2, layer.weight.t()),
             lambda: kt.lora_down(dy2, lora_b.t()),
             lambda: kt.lora_up_(dx, g, lora_a.t(), s_x, mask, accumulate=False),
             lambda: dx.addmm_(dy2, layer.weight),
             lambda: kt.per_example_grads(dy2, h, rows, None, t, SCALING, True),
             lambda: kt.per_example_grads(x2, g, rows, None, t, s_x, True, mask=mask)]
    n, k = x2.shape
    entries = fused_kernels(n, k, dy2.shape[1], x2.dtype.itemsize, "fwdbwd")
    for call, entry in zip(calls, entries):
        yield entry[0], time_ms(call, device, reps)[0], entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="small float32 shapes on CPU (default without CUDA)")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per call (default 4096 16384; CPU 64)")
    parser.add_argument("--seq", type=int, help="tokens per example (default 2048; CPU 16)")
    parser.add_argument("--shapes", type=int, nargs="+", help="d_in d_out pairs (default LLaMA-2-13B's three)")
    parser.add_argument("--providers", nargs="+", default=["base", "cublas", "peft4", "eager", "fused"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd", "fwdbwd"])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (CUDA uses do_bench)")
    parser.add_argument("--profile", action="store_true", help="per-kernel breakdown of the fused fwd+bwd")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.reps < 2:
        parser.error("--reps must be at least 2 (the spread needs two timings)")
    if args.shapes and len(args.shapes) % 2:
        parser.error("--shapes takes d_in d_out pairs")

    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    shapes = (list(zip(args.shapes[::2], args.shapes[1::2])) if args.shapes
              else CPU_SHAPES if cpu else LLAMA_13B_SHAPES)
    tokens_list = args.tokens or ([64] if cpu else [4096, 16384])
    seq = args.seq or (16 if cpu else 2048)
    device_name = "cpu" if cpu else torch.cuda.get_device_name(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()
    bandwidth, gemm_rate = measure_rates(device, dtype, args.reps)
    print(f"device {device_name}, dtype {dtype}, commit {commit}; measured copy {bandwidth / 1e9:.1f} GB/s "
          f"(read + write), GEMM {gemm_rate / 1e12:.2f} TFLOP/s")

    rows, profile_rows = [], []
    common = lambda d_in, d_out, tokens: dict(device=device_name, date=stamp, commit=commit, d_in=d_in,  # noqa: E731
                                              d_out=d_out, tokens=tokens, seq=seq,
                                              dtype=str(dtype).removeprefix("torch."))
    for d_in, d_out in shapes:
        for tokens in tokens_list:
            if tokens % seq:
                raise SystemExit(f"--tokens {tokens} is not a multiple of --seq {seq}")
            layer = Layer(d_in, d_out, tokens, seq, dtype, device)
            table = providers(layer, include_fused="fused" in args.providers)
            e = dtype.itemsize
            for mode in args.modes:
                floor = model_ms(floor_kernels(tokens, d_in, d_out, e, mode), bandwidth, gemm_rate)
                print(f"{d_in}x{d_out} tokens={tokens} {mode}  floor (model) {floor:.3f} ms")
                base_median = None
                for name in args.providers:
                    fn = step(layer, name, table[name], mode)
                    median, p20, p80 = time_ms(fn, device, args.reps)
                    mem = peak_mb(fn, device)
                    # eager and peft4 run many small PyTorch ops; they are measured, not modelled.
                    modelled = (model_ms(MODELS[name](tokens, d_in, d_out, e, mode), bandwidth, gemm_rate)
                                if name in MODELS else None)
                    model_text = f"{modelled:8.3f} ms" if modelled is not None else "     n/a   "
                    base_median = median if name == "base" else base_median
                    ratio = f"{median / base_median:6.2f}x base" if base_median else ""
                    print(f"  {name:6s} median {median:9.3f} ms  p20 {p20:9.3f}  p80 {p80:9.3f}  "
                          f"peak {mem:9.1f} MB  model {model_text}  {ratio}")
                    rows.append(dict(common(d_in, d_out, tokens), provider=name, mode=mode,
                                     median_ms=f"{median:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
                                     peak_mb=f"{mem:.1f}",
                                     model_ms="" if modelled is None else f"{modelled:.4f}"))
                    del fn
            if args.profile:
                print(f"{d_in}x{d_out} tokens={tokens}: fused fwd+bwd, one launch at a time")
                for kernel, median, (_, nbytes, flops) in profile_fused(layer, device, args.reps, bandwidth,
                                                                         gemm_rate):
                    gbps = nbytes / (median / 1e3) / 1e9
                    modelled = model_ms([(kernel, nbytes, flops)], bandwidth, gemm_rate)
                    print(f"  {kernel:34s} {median:9.3f} ms  model {modelled:8.3f} ms  {nbytes / 2**20:9.1f} MB "
                          f"{gbps:8.1f} GB/s ({100 * gbps * 1e9 / bandwidth:5.1f}% of copy)")
                    profile_rows.append(dict(common(d_in, d_out, tokens), kernel=kernel, median_ms=f"{median:.4f}",
                                             model_mb=f"{nbytes / 2**20:.2f}", model_gflop=f"{flops / 1e9:.3f}",
                                             achieved_gb_s=f"{gbps:.1f}",
                                             pct_of_copy=f"{100 * gbps * 1e9 / bandwidth:.1f}",
                                             model_ms=f"{modelled:.4f}"))
    if not args.no_csv:
        append_csv_rows(CSV_PATH, CSV_FIELDS, rows)
        print(f"appended {len(rows)} rows to {CSV_PATH}")
        if profile_rows:
            append_csv_rows(PROFILE_CSV_PATH, PROFILE_FIELDS, profile_rows)
            print(f"appended {len(profile_rows)} rows to {PROFILE_CSV_PATH}")


if __name__ == "__main__":
    main()
