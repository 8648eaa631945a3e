"""Every LoRA kernel launch compiles for sm_90a and sm_80 (bf16, fp16, fp32) without register spills.

No GPU is needed: ``kernels.compile_check`` compiles ahead of time with ``triton.compile`` for a
``GPUTarget`` and reads registers / stack / shared memory with the cuobjdump shipped in the triton
wheel. It runs in a subprocess because this test process has TRITON_INTERPRET=1 (set by conftest for
the interpreter tests), under which kernels cannot be compiled. Compiled kernels are cached by Triton,
so reruns take seconds; a cold run compiles about 230 variants (a few minutes on 2 cores).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills():
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--jobs", "2"], cwd=ROOT,
                            env=_check_env(), capture_output=True, text=True, timeout=1500)
    print(result.stdout)  # the table: pytest -s shows it
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "sm_90a" in result.stdout and "sm_80" in result.stdout
    for kernel in ("lora_down_kernel", "lora_up_kernel", "per_example_grad_kernel", "keep_mask_kernel"):
        assert kernel in result.stdout


def test_compile_check_refuses_to_run_interpreted():
    env = dict(_check_env(), TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--targets", "90"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unset TRITON_INTERPRET" in result.stderr


def test_compile_check_reports_a_spill(monkeypatch):
    """The check must be able to fail: a result with a stack frame is reported as a spill."""
    from kernels import compile_check

    fake = compile_check.Variant("lora_down_kernel", "bfloat16", (), (("BLOCK_N", 64),), (), 4, 3)
    monkeypatch.setattr(compile_check, "variants", lambda dtype, target: [fake])
    monkeypatch.setattr(compile_check, "compile_one",
                        lambda v, cc: dict(variant=v, capability=cc, regs=255, stack=48, local=0, smem=0))
    results, failures = compile_check.run([90], ["bfloat16"], jobs=1)
    assert len(failures) == 1 and "register spill (STACK 48 B" in failures[0]
    monkeypatch.setattr(compile_check, "compile_one",
                        lambda v, cc: dict(variant=v, capability=cc, error="CompilationError: boom"))
    results, failures = compile_check.run([90], ["bfloat16"], jobs=1)
    assert len(failures) == 1 and "compile error" in failures[0]
    assert "lora_down_kernel" in compile_check.table(results)
