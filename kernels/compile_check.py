"""Compile every LoRA kernel launch for real GPU targets, without a GPU, and report its resources.

    python -m kernels.compile_check                 # sm_90a and sm_80, bf16/fp16/fp32; exit 1 on failure
    python -m kernels.compile_check --targets 90 --dtypes bfloat16

Which launches: the fused op's forward and backward are run on ``meta`` tensors at LLaMA-2-13B shapes
(4 groups x rank 8, three groups trained) with every option a caller can set (dropout on/off, Fisher
on/off, with/without bias, 3-D batches, 2-D one-token batches, packed ``cu_seqlens`` batches, float32
adapters on a 16-bit model, and the accumulating form of the up-projection) and one token count per shape class of ``kernels.lora_configs``; each ``Launch`` is recorded
instead of run, and its pointers and strides are specialised by Triton's own rules (a stride of 1
becomes a constant, multiples of 16 get divisibility hints; sizes stay general i32). So what is
compiled is what the launchers pick.

Each distinct launch is compiled with ``triton.compile`` for ``GPUTarget("cuda", cc, 32)`` (cc 90
selects sm_90a) and its cubin read with the ``cuobjdump --dump-resource-usage`` that ships with
Triton: registers per thread, STACK (bytes of local memory: non-zero means register spills) and the
dynamic shared memory Triton reserves. A compile error or a spill (any target, any dtype) fails the
check. Compiled kernels land in Triton's cache, so a second run is
fast. Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
D_IN, D_OUT = 5120, 13824  # LLaMA-2-13B gate/up projection: both wide sides differ, both are large
RANK, GROUPS, TRAINED = 8, 4, 3
SEQ = 2048


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    num_warps: int
    num_stages: int

    def label(self) -> str:
        flags = [f"{k}={v}" for k, v in self.constexprs if k.isupper()
                 and not isinstance(v, str) and not k.startswith("stride") and v not in (False,)]
        return ",".join(flags)


def _record_launches(dtype: torch.dtype) -> list:
    """Run the fused op on meta tensors with every caller option; return the Launches it would run."""
    from kernels import lora_configs
    from kernels import lora_triton
    from kernels.multi_lora_linear import multi_lora_linear_triton

    launches = []
    with mock.patch.object(lora_triton.Launch, "__call__", lambda self: launches.append(self)):
        meta = torch.device("meta")
        float32 = dtype == torch.float32
        token_counts = sorted({t for k in lora_configs.CONFIGS
                               for t in lora_configs.representative_tokens(k, float32)})
        rows = torch.arange(TRAINED * RANK, device=meta)
        for tokens in token_counts:
            seq = min(SEQ, tokens)
            layouts = {"batch": (tokens // seq, seq, D_IN), "tokens": (tokens, D_IN), "packed": (tokens, D_IN)}
            for layout, shape in layouts.items():
                for p in (0.0, 0.05):
                    for fisher, with_bias in ((True, True), (False, False)):
                        for adapter_dtype in {dtype, torch.float32}:
                            x = torch.empty(shape, device=meta, dtype=dtype, requires_grad=True)
                            w = torch.empty(D_OUT, D_IN, device=meta, dtype=dtype)
                            a = torch.empty(GROUPS * RANK, D_IN, device=meta, dtype=adapter_dtype, requires_grad=True)
                            b = torch.empty(D_OUT, GROUPS * RANK, device=meta, dtype=adapter_dtype,
                                            requires_grad=True)
                            examples = shape[0] if layout != "packed" else max(1, tokens // seq)
                            cu = (torch.empty(examples + 1, device=meta, dtype=torch.int32)
                                  if layout == "packed" else None)
                            fa = torch.empty(a.shape, device=meta) if fisher else None
                            fb = torch.empty(b.shape, device=meta) if fisher else None
                            c = torch.empty(examples, device=meta) if fisher else None
                            bias = torch.empty(D_OUT, device=meta, dtype=dtype) if with_bias else None
                            y = multi_lora_linear_triton(x, w, bias, a, b, 0.5, p, 1, rows, fa, fb, c, cu)
                            y.backward(torch.empty_like(y))
        h = torch.empty(token_counts[-1], GROUPS * RANK, device=meta)
        out = torch.empty(token_counts[-1], D_OUT, device=meta, dtype=dtype)
        launches.append(lora_triton.plan_lora_up(out, h, b, 0.5, None, None, True))  # the accumulate form
        launches.append(lora_triton.plan_keep_mask(
            torch.empty(token_counts[-1], D_IN // 8, device=meta, dtype=torch.uint8), D_IN, 0.05, 1))
    return launches


def variants(dtype_name: str, target) -> list[Variant]:
    """Distinct (kernel, specialised signature, constexprs, options) of the launches for one input dtype."""
    from triton._C.libtriton import native_specialize_impl
    from triton.compiler.compiler import make_backend

    backend = type(make_backend(target))
    found = {}
    for launch in _record_launches(DTYPES[dtype_name]):
        signature, constexprs, attrs = {}, dict(launch.constexprs), {}
        for name in launch.kernel.arg_names:
            if name in launch.constexprs:
                signature[name] = "constexpr"
                continue
            value = launch.args[name]
            if isinstance(value, int) and not name.startswith("stride"):
                # Sizes and counts vary per call; compile them as the general i32 case (Triton would also
                # build a variant for a size of 1 or a multiple of 16: same code up to constant folding).
                value = 2**20 + 1
            kind, attr = native_specialize_impl(backend, value, False, True, True)
            if kind == "constexpr":
                signature[name], constexprs[name] = "constexpr", attr
            else:
                signature[name] = kind
                if attr:
                    attrs[name] = attr
        v = Variant(launch.kernel.__name__.strip("_"), dtype_name, tuple(signature.items()),
                    tuple(sorted(constexprs.items())), tuple(sorted(attrs.items())), launch.num_warps,
                    launch.num_stages)
        found[v] = None
    return list(found)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_one(v: Variant, capability: int) -> dict:
    """Compile one variant; returns its resources or the compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import lora_triton

    fn = getattr(lora_triton, "_" + v.kernel)
    target = GPUTarget("cuda", capability, 32)
    backend = type(triton.compiler.compiler.make_backend(target))
    attrs = {(fn.arg_names.index(k),): backend.parse_attr(a) for k, a in v.attrs}
    result = dict(variant=v, capability=capability)
    try:
        kernel = triton.compile(ASTSource(fn, dict(v.signature), dict(v.constexprs), attrs), target=target,
                                options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    except Exception as exc:  # any compiler failure is a finding, reported in the table
        return dict(result, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                              check=True, timeout=60).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", dump))
    return dict(result, regs=int(usage["REG"]), stack=int(usage["STACK"]), local=int(usage.get("LOCAL", 0)),
                smem=int(kernel.metadata.shared))


def _compile_star(job):
    return compile_one(*job)


def run(targets: list[int], dtypes: list[str], jobs: int,
        kernels: list[str] | None = None) -> tuple[list[dict], list[str]]:
    from triton.backends.compiler import GPUTarget

    work = [(v, cc) for cc in targets for d in dtypes for v in variants(d, GPUTarget("cuda", cc, 32))
            if not kernels or v.kernel.removesuffix("_kernel") in kernels]
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_star, work))
    else:
        results = [compile_one(*job) for job in work]
    failures = []
    for r in results:
        v = r["variant"]
        where = f"{v.kernel} sm_{r['capability']} {v.dtype} [{v.label()}]"
        if "error" in r:
            failures.append(f"{where}: compile error: {r['error']}")
        elif r["stack"] or r["local"]:
            failures.append(f"{where}: register spill (STACK {r['stack']} B, LOCAL {r['local']} B, {r['regs']} regs)")
    return results, failures


def table(results: list[dict]) -> str:
    """One line per kernel, target and dtype: the worst registers / stack / shared memory over its variants."""
    worst = {}
    for r in results:
        v = r["variant"]
        key = (v.kernel, r["capability"], v.dtype)
        row = worst.setdefault(key, dict(n=0, regs=0, stack=0, smem=0, errors=0))
        row["n"] += 1
        if "error" in r:
            row["errors"] += 1
            continue
        row["regs"], row["stack"] = max(row["regs"], r["regs"]), max(row["stack"], r["stack"] + r["local"])
        row["smem"] = max(row["smem"], r["smem"])
    lines = [f"{'kernel':22s} {'target':7s} {'dtype':9s} {'variants':>8s} {'max regs':>8s} {'max stack':>9s} "
             f"{'max smem KiB':>12s} {'errors':>6s}"]
    for (kernel, cc, dtype), row in sorted(worst.items()):
        arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
        lines.append(f"{kernel:22s} {arch:7s} {dtype:9s} {row['n']:8d} {row['regs']:8d} {row['stack']:9d} "
                     f"{row['smem'] / 1024:12.1f} {row['errors']:6d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiler processes")
    parser.add_argument("--kernels", nargs="+", help="only these (lora_down, lora_up, per_example_grad, keep_mask)")
    parser.add_argument("--verbose", action="store_true", help="one line per variant")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)",
              file=sys.stderr)
        return 2
    results, failures = run(args.targets, args.dtypes, args.jobs, args.kernels)
    if args.verbose:
        for r in results:
            v = r["variant"]
            print(f"{v.kernel:22s} sm_{r['capability']} {v.dtype:9s} w{v.num_warps} s{v.num_stages} "
                  + (f"ERROR {r['error']}" if "error" in r else
                     f"regs {r['regs']:3d} stack {r['stack']:4d} smem {r['smem']:6d}") + f"  {v.label()}")
    print(table(results))
    for f in failures:
        print("FAIL", f)
    print(f"{len(results)} compiles, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
