"""The PEMA update over lists of tensors through the native op ``mage::pema_update_`` (csrc/).

``pema_update_multi_`` computes what looping ``mage.pema.pema_update_`` over the lists computes, in
one call: on CPU with at::parallel_for, on CUDA with a few multi-tensor launches. When the extension
``mage._C`` is not built (or lacks a kernel for the tensors' device) it falls back to that loop and
warns once.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from mage.pema import pema_update_

OP_NAME = "mage::pema_update_"


def _import_extension() -> str | None:
    """Import mage._C, which registers the op; return why that failed, or None."""
    try:
        import mage._C  # noqa: F401
    except ImportError as exc:
        return f"mage._C could not be imported: {exc}"
    return None


_IMPORT_ERROR = _import_extension()
NATIVE_LOADED: bool = _IMPORT_ERROR is None
# Device types with a native kernel, fixed at import so torch.compile traces a constant lookup.
NATIVE_DEVICE_TYPES: frozenset[str] = frozenset(
    device_type for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if NATIVE_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)
)
_fallback_warned = False

if NATIVE_LOADED:

    @torch.library.register_fake(OP_NAME)
    def _pema_update_fake(emas, params, grads, fishers, fisher_prevs, rule, lam, beta_min, beta_max,
                          fixed_beta) -> None:
        # The op only mutates emas in place: there is no output to describe.
        return None


def native_available(device: torch.device | str = "cpu") -> bool:
    """True when the native op has a kernel for tensors on ``device`` (CUDA needs a build with nvcc)."""
    return torch.device(device).type in NATIVE_DEVICE_TYPES


def _warn_fallback_once(device_type: str) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    reason = _IMPORT_ERROR or (f"mage._C has no {device_type} kernel (built without CUDA: nvcc not found "
                               "or MAGE_SKIP_CUDA_BUILD=1)")
    warnings.warn(
        f"{OP_NAME} native op unavailable ({reason}); falling back to a Python loop over "
        "mage.pema.pema_update_, which gives the same result more slowly. Build the op with "
        "`pip install --no-build-isolation -e .` (see setup.py).",
        RuntimeWarning,
        stacklevel=3,
    )


def pema_update_multi_(
    emas: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    *,
    lam: float = 1e-5,
    beta_min: float = 0.0,
    beta_max: float = 1.0,
    mode: str = "paper",
    fixed_beta: float = 0.99,
    fisher_prevs: Sequence[torch.Tensor] | None = None,
) -> None:
    """theta* <- beta * theta* + (1 - beta) * theta for every tensor group, in place on ``emas``.

    ``emas`` are contiguous float32; ``params`` and ``grads`` float32 or bfloat16 (upcast); ``fishers``
    (the mean Fisher) and ``fisher_prevs`` (needed by mode "fisher") float32; all of one shape per
    group and on one device. Modes and scalars as in ``mage.pema.pema_update_`` (docs/METHOD.md section 4).
    """
    emas, params, grads, fishers = list(emas), list(params), list(grads), list(fishers)
    prevs = None if fisher_prevs is None else list(fisher_prevs)
    first = next(iter(emas + params + grads + fishers + (prevs or [])), None)
    if first is None:  # nothing to update, and the dispatcher needs a tensor to pick a kernel
        return
    if native_available(first.device):
        torch.ops.mage.pema_update_(emas, params, grads, fishers, prevs, mode, float(lam), float(beta_min),
                                    float(beta_max), float(fixed_beta))
        return
    _warn_fallback_once(first.device.type)
    for name, items in (("params", params), ("grads", grads), ("fishers", fishers), ("fisher_prevs", prevs)):
        if items is not None and len(items) != len(emas):
            raise ValueError(f"pema_update_multi_: got {len(emas)} emas but {len(items)} {name}; pass exactly "
                             f"one entry of {name} per EMA tensor, in the same order")
    for i, ema in enumerate(emas):
        pema_update_(ema, params[i], grads[i], fishers[i], lam=lam, beta_min=beta_min, beta_max=beta_max,
                     mode=mode, fixed_beta=fixed_beta, fisher_prev=None if prevs is None else prevs[i])
