"""Benchmark the four-group LoRA linear (4 x rank 8) with per-example Fisher.

    python benchmarks/bench_lora4.py            # CUDA: LLaMA-2-13B shapes, bf16
    python benchmarks/bench_lora4.py --cpu      # small float32 shapes (Triton interpreter), < 1 minute

Providers:
  base   the frozen GEMMs alone (x W^T + b forward, dy W backward): the floor any LoRA path sits on
  peft4  four separate rank-8 adapters (PEFT style) plus a per-example Fisher by einsum in a hook on dy
  eager  mage.lora_function.multi_lora_linear_eager (stacked rank 32, batched einsum Fisher)
  fused  kernels.multi_lora_linear.multi_lora_linear_triton
Modes: fwd, bwd (backward of a retained graph), fwdbwd. Three of the four groups train (tasks with
text+image input and text output), dropout 0.05, Fisher on. Rows are appended to
benchmarks/results/lora4.csv.
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

from mage.provenance import append_csv_rows, git_commit

if not torch.cuda.is_available() or "--cpu" in sys.argv:
    # The fused kernels need the interpreter on CPU; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

RANK, GROUPS, TRAINED_GROUPS = 8, 4, (0, 1, 2)
R = RANK * GROUPS
DROPOUT, SCALING = 0.05, 1.0
LLAMA_13B_SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]  # (d_in, d_out): attention, gate/up, down
CPU_SHAPES = [(64, 96), (96, 64)]
CSV_PATH = Path(__file__).resolve().parent / "results" / "lora4.csv"
CSV_FIELDS = ["device", "date", "commit", "d_in", "d_out", "tokens", "seq", "dtype", "provider", "mode",
              "median_ms", "p20_ms", "p80_ms", "peak_mb"]
# (bf16 dense TFLOP/s, HBM TB/s) by device-name fragment; the first match wins, H100 SXM is the default.
PEAKS = [("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
         ("A100", 312e12, 2.0e12), ("L40S", 362e12, 0.864e12)]


class Layer:
    """One adapted linear layer's tensors, and the providers that run it."""

    def __init__(self, d_in: int, d_out: int, tokens: int, seq: int, dtype: torch.dtype, device: torch.device):
        g = torch.Generator(device=device).manual_seed(0)
        randn = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
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

    def base(self) -> torch.Tensor:
        return torch.nn.functional.linear(self.x, self.weight, self.bias)

    def stacked(self, fn: Callable) -> torch.Tensor:
        lora_a, lora_b = torch.cat(self.a_groups), torch.cat(self.b_groups, dim=1)
        return fn(self.x, self.weight, self.bias, lora_a, lora_b, SCALING, DROPOUT, self.seed, self.grad_rows,
                  self.fisher_a, self.fisher_b, None)

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


def providers(layer: Layer, include_fused: bool) -> dict[str, Callable[[], torch.Tensor]]:
    from mage.lora_function import multi_lora_linear_eager

    table = {"base": layer.base, "peft4": layer.peft4, "eager": lambda: layer.stacked(multi_lora_linear_eager)}
    if include_fused:
        from kernels.multi_lora_linear import multi_lora_linear_triton

        table["fused"] = lambda: layer.stacked(multi_lora_linear_triton)
    return table


def clear_grads(layer: Layer) -> None:
    for t in [layer.x, *layer.a_groups, *layer.b_groups]:
        t.grad = None


def step(layer: Layer, forward: Callable[[], torch.Tensor], mode: str) -> Callable[[], None]:
    """The callable to time for one mode (bwd replays the backward of one retained graph)."""
    if mode == "fwd":
        return lambda: forward()
    if mode == "fwdbwd":
        return lambda: forward().backward(layer.dy)
    y = forward()
    return lambda: y.backward(layer.dy, retain_graph=True)


def time_ms(fn: Callable[[], None], device: torch.device, reps: int) -> tuple[float, float, float]:
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


def peak_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory one call adds on top of what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def roofline_ms(d_in: int, d_out: int, tokens: int, mode: str, elem_bytes: int, peak_flops: float,
                bandwidth: float) -> tuple[float, float]:
    """(compute floor, memory floor) in ms for the base GEMMs plus LoRA, counting only unavoidable traffic."""
    r_train = RANK * len(TRAINED_GROUPS)
    fwd_flops = 2 * tokens * d_in * d_out + 2 * tokens * R * (d_in + d_out)
    bwd_flops = (2 * tokens * d_in * d_out + 2 * tokens * R * (d_in + d_out)
                 + 2 * tokens * r_train * (d_in + d_out))
    weights = d_in * d_out * elem_bytes
    fwd_bytes = weights + tokens * (d_in + d_out) * elem_bytes  # read x, write y
    bwd_bytes = weights + tokens * (2 * d_in + d_out) * elem_bytes  # read dy and x, write dx
    flops = {"fwd": fwd_flops, "bwd": bwd_flops, "fwdbwd": fwd_flops + bwd_flops}[mode]
    nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwdbwd": fwd_bytes + bwd_bytes}[mode]
    return flops / peak_flops * 1e3, nbytes / bandwidth * 1e3




def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="small float32 shapes on CPU (default without CUDA)")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per call (default 4096 16384; CPU 64)")
    parser.add_argument("--seq", type=int, help="tokens per example (default 1024; CPU 16)")
    parser.add_argument("--providers", nargs="+", default=["base", "peft4", "eager", "fused"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd", "fwdbwd"])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (CUDA uses do_bench)")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.reps < 2:
        parser.error("--reps must be at least 2 (the spread needs two timings)")

    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    shapes = CPU_SHAPES if cpu else LLAMA_13B_SHAPES
    tokens_list = args.tokens or ([64] if cpu else [4096, 16384])
    seq = args.seq or (16 if cpu else 1024)
    device_name = "cpu" if cpu else torch.cuda.get_device_name(device)
    _, peak_flops, bandwidth = next((p for p in PEAKS if p[0] in device_name), PEAKS[2])
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()
    print(f"device {device_name}, dtype {dtype}, commit {commit}"
          + ("" if cpu else f", peaks {peak_flops / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s"))

    rows = []
    for d_in, d_out in shapes:
        for tokens in tokens_list:
            if tokens % seq:
                raise SystemExit(f"--tokens {tokens} is not a multiple of --seq {seq}")
            layer = Layer(d_in, d_out, tokens, seq, dtype, device)
            table = providers(layer, include_fused=True)
            for mode in args.modes:
                header = f"{d_in}x{d_out} tokens={tokens} {mode}"
                if not cpu:
                    compute, memory = roofline_ms(d_in, d_out, tokens, mode, dtype.itemsize, peak_flops, bandwidth)
                    header += (f"  roofline floor {max(compute, memory):.3f} ms "
                               f"(compute {compute:.3f}, memory {memory:.3f})")
                print(header)
                for name in args.providers:
                    clear_grads(layer)
                    fn = step(layer, table[name], mode)
                    median, p20, p80 = time_ms(fn, device, args.reps)
                    mem = peak_mb(fn, device)
                    print(f"  {name:6s} median {median:9.3f} ms  p20 {p20:9.3f}  p80 {p80:9.3f}  peak {mem:9.1f} MB")
                    rows.append(dict(device=device_name, date=stamp, commit=commit, d_in=d_in, d_out=d_out,
                                     tokens=tokens, seq=seq, dtype=str(dtype).removeprefix("torch."), provider=name,
                                     mode=mode, median_ms=f"{median:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
                                     peak_mb=f"{mem:.1f}"))
                    del fn
    if not args.no_csv:
        append_csv_rows(CSV_PATH, CSV_FIELDS, rows)
        print(f"appended {len(rows)} rows to {CSV_PATH}")


if __name__ == "__main__":
    main()
