"""benchmarks/bench_step.py stays runnable on CPU (--tiny): one optimizer step, plain LoRA and MAGE."""
from __future__ import annotations

import math

from tests.benchmark_modules import load_benchmark


def test_bench_step_tiny_runs_both_providers():
    bench = load_benchmark("bench_step")
    rows = bench.main(["--tiny", "--no-csv", "--reps", "1", "--providers", "lora", "mage"])
    assert [r["provider"] for r in rows] == ["lora", "mage"]
    for r in rows:
        assert r["device"] == "cpu" and r["tokens"] == 128 and r["mfu"] == ""
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and r["tokens_per_s"] > 0
