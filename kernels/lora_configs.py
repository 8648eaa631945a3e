"""Block sizes of the LoRA kernels per shape class, kept as data.

Each kernel maps to a list of (max_tokens, config) (16-bit inputs: CONFIGS; float32 inputs:
FLOAT32_CONFIGS where listed); the first entry whose max_tokens is >= the token
count of the call (None: any) is used. A config holds the kernel's BLOCK_* constexprs plus num_warps and
num_stages. Rules every entry must keep (checked by tests/test_kernels_compile.py, which compiles every
entry for sm_90a and sm_80):

- tl.dot needs every block dimension >= 16; the dropout bit mask needs the column blocks to be
  multiples of 8 (one byte holds eight columns).
- no register spills (cuobjdump STACK == 0) at sm_90a and sm_80 for bf16, fp16 and fp32 inputs.

How they were chosen: without a GPU, only for no spills and enough programs to fill 132 SMs at the
LLaMA-2-13B shapes (8 x 2048 tokens); none is timed yet. ``benchmarks/gpu_check.sh --profile`` is the
harness to time alternatives on a GPU and edit this table.
"""
from __future__ import annotations

# Token classes: decode/evaluation batches, training micro-batches of a few sequences, full batches.
SMALL, MEDIUM = 256, 4096

CONFIGS: dict[str, list[tuple[int | None, dict]]] = {
    # h = drop(x) A^T: one program per BLOCK_N tokens walks the whole d_in; the accumulator is BLOCK_N x R.
    "lora_down": [
        (SMALL, dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=3)),
        (MEDIUM, dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3)),
        (None, dict(BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)),
    ],
    # out (+)= s h B^T (* keep): a pure streaming pass over out; the dot has K = R.
    "lora_up": [
        (SMALL, dict(BLOCK_N=32, BLOCK_M=64, num_warps=4, num_stages=2)),
        (None, dict(BLOCK_N=64, BLOCK_M=128, num_warps=8, num_stages=2)),
    ],
    # per-example G_n = u_n^T v_n over a BLOCK_D slice of the wide side, BLOCK_T tokens at a time.
    "per_example_grad": [
        (None, dict(BLOCK_D=64, BLOCK_T=32, num_warps=4, num_stages=3)),
    ],
    "keep_mask": [
        (None, dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=1)),
    ],
}

# float32 inputs (tests, float32 models): twice the bytes per element and full-precision dots need
# smaller tiles to stay in registers. Kernels not listed use CONFIGS.
FLOAT32_CONFIGS: dict[str, list[tuple[int | None, dict]]] = {
    "lora_down": [(None, dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2))],
    "lora_up": [(None, dict(BLOCK_N=32, BLOCK_M=64, num_warps=4, num_stages=2))],
    "per_example_grad": [(None, dict(BLOCK_D=32, BLOCK_T=16, num_warps=4, num_stages=1))],
}


def _table(kernel: str, float32: bool) -> list[tuple[int | None, dict]]:
    return FLOAT32_CONFIGS[kernel] if float32 and kernel in FLOAT32_CONFIGS else CONFIGS[kernel]


def pick(kernel: str, tokens: int, float32: bool = False) -> dict:
    """The config of ``kernel`` for a call over ``tokens`` tokens (a copy the caller may edit)."""
    for max_tokens, config in _table(kernel, float32):
        if max_tokens is None or tokens <= max_tokens:
            return dict(config)
    raise KeyError(f"no config of {kernel} covers {tokens} tokens; the last entry must have max_tokens None")


def representative_tokens(kernel: str, float32: bool = False) -> list[int]:
    """One token count inside each shape class of ``kernel`` (picks every entry exactly once)."""
    counts, low = [], 0
    for max_tokens, _ in _table(kernel, float32):
        counts.append(max_tokens if max_tokens is not None else max(low * 4, 16384))
        low = max_tokens or low
    return counts
