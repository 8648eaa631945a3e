#!/usr/bin/env bash
# Everything a GPU can tell us that CI cannot, on one H100/H200 in under 8 minutes:
#   1. the gpu-marked tests (bf16 kernels against the float64 reference, the CUDA PEMA op),
#   2. bench_lora4.py (all providers, LLaMA-2-13B shapes) with its per-kernel breakdown (--profile),
#   3. bench_pema.py and bench_step.py (8 decoder layers).
# Each stage has its own time limit (together 7.5 minutes); results are appended to benchmarks/results/*.csv with the GPU's
# name, date and commit. Commit those rows.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --smoke    # CPU: the same stages at toy sizes, nothing appended (CI-safe)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, not an installed copy

smoke=0
[[ "${1:-}" == "--smoke" ]] && smoke=1
start=$SECONDS
failed=()
stage() {  # stage NAME LIMIT_SECONDS CMD... ; a failing stage is reported, the next ones still run
    local name=$1 limit=$2 rc=0
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" || rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    (( rc == 0 )) || failed+=("$name (exit $rc)")
}

if (( smoke )); then
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=1
    stage "gpu tests (collected; they skip without a GPU)" 300 python -m pytest -q -m gpu tests -p no:cacheprovider
    stage "bench_lora4 + profile" 300 python benchmarks/bench_lora4.py --cpu --no-csv --reps 2 --profile \
        --tokens 32 --modes fwdbwd
    stage "bench_pema" 300 python benchmarks/bench_pema.py --device cpu --scale 0.01 --layers 1 --iters 2 --csv ''
    stage "bench_step" 300 python benchmarks/bench_step.py --tiny --layers 1 --reps 2 --providers lora mage --no-csv
else
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device: run with --smoke on CPU" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
    stage "gpu tests" 90 python -m pytest -q -m gpu tests -p no:cacheprovider
    stage "bench_lora4 + profile" 180 python benchmarks/bench_lora4.py --profile
    stage "bench_pema" 60 python benchmarks/bench_pema.py
    stage "bench_step (8 layers)" 120 python benchmarks/bench_step.py --layers 8
fi
if (( ${#failed[@]} )); then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: all stages passed in $((SECONDS - start))s"
