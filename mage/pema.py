"""PEMA: the parameter-wise EMA of MAGE (docs/METHOD.md section 4), eager reference.

The fast multi-tensor op in ``mage.ops`` must match this function; it is also the fallback
when the native extension is not built.
"""
from __future__ import annotations

import torch

PEMA_MODES = ("paper", "taylor", "fixed", "fisher")


def pema_beta(
    delta: torch.Tensor,
    grad: torch.Tensor,
    fisher: torch.Tensor,
    *,
    lam: float = 1e-5,
    beta_min: float = 0.0,
    beta_max: float = 1.0,
    mode: str = "paper",
    fixed_beta: float = 0.99,
    fisher_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """The elementwise EMA weight beta (float32) of one PEMA step; delta = param - ema."""
    if mode == "paper":
        raw = (grad + 1.0) / (delta * (fisher * fisher + lam))
    elif mode == "taylor":
        raw = grad / (delta * (fisher + lam))
    elif mode == "fixed":
        raw = torch.full_like(delta, fixed_beta)
    elif mode == "fisher":
        if fisher_prev is None:
            raise ValueError("pema mode 'fisher' needs fisher_prev (the running sum of earlier tasks' Fisher)")
        total = fisher_prev + fisher
        # Where both are 0 the entry never mattered to any task: w = 0 gives the plain EMA.
        w = torch.where(total > 0, fisher_prev / total, torch.zeros_like(total))
        raw = fixed_beta + (1.0 - fixed_beta) * w
    else:
        raise ValueError(f"unknown PEMA mode {mode!r}; choose one of {PEMA_MODES}")
    # The paper's rule divides by delta, which is exactly 0 at the start of a task: a non-finite
    # beta means "no information", and the spec keeps the EMA there (beta_max).
    beta = raw.clamp(beta_min, beta_max)
    return torch.where(torch.isfinite(raw), beta, torch.full_like(beta, beta_max))


@torch.no_grad()
def pema_update_(
    ema: torch.Tensor,
    param: torch.Tensor,
    grad: torch.Tensor,
    fisher: torch.Tensor,
    *,
    lam: float = 1e-5,
    beta_min: float = 0.0,
    beta_max: float = 1.0,
    mode: str = "paper",
    fixed_beta: float = 0.99,
    fisher_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """theta* <- beta * theta* + (1 - beta) * theta, in place on the float32 ``ema``.

    ``fisher`` is the mean Fisher (already divided by the example count) and ``grad`` the step's
    averaged gradient, both of ``param``'s shape. Returns ``ema``.
    """
    if ema.dtype != torch.float32:
        raise TypeError(f"PEMA keeps its EMA in float32, got ema of dtype {ema.dtype}; allocate it with .float()")
    for name, t in (("param", param), ("grad", grad), ("fisher", fisher), ("fisher_prev", fisher_prev)):
        if t is not None and t.shape != ema.shape:
            raise ValueError(f"pema_update_: {name} has shape {tuple(t.shape)} but ema has {tuple(ema.shape)}")
    p = param.float()
    prev = None if fisher_prev is None else fisher_prev.float()
    beta = pema_beta(
        p - ema, grad.float(), fisher.float(), lam=lam, beta_min=beta_min, beta_max=beta_max,
        mode=mode, fixed_beta=fixed_beta, fisher_prev=prev,
    )
    # Written as beta*ema + (1-beta)*p (not a lerp) so beta = 1 keeps ema and beta = 0 copies p bit-exactly;
    # the native op uses the same expression.
    ema.mul_(beta).add_((1.0 - beta) * p)
    return ema
