"""What fraction of a task's change each PEMA mode keeps, on toy trajectories (docs/METHOD.md, "PEMA").

A wrong horizon, a Fisher compared unlike with like, or a paper/taylor rule that is not the sign gate
it reduces to, each changes the fraction measured here.
"""
from __future__ import annotations

import pytest
import torch

from mage import pema
from mage.lora import iter_multi_lora
from mage.methods import build_method
from mage.methods.base import lora_group_params
from mage.trainer.config import MethodConfig
from tests.test_methods import tiny_model

GROUPS = (0, 3)


def kept_fraction_of_linear_path(beta: float, steps: int) -> float:
    """EMA (from theta_0) of theta_t = t/steps after `steps` updates: sum_t (1-b) b^(N-t) t/N."""
    return sum((1 - beta) * beta ** (steps - t) * t / steps for t in range(1, steps + 1))


def walk_linear_path(method, model, steps: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Set every trainable LoRA tensor to theta_0 + (t/N) D for t = 1..N, one PEMA step each."""
    gen = torch.Generator().manual_seed(seed)
    named = method._trainable_lora()
    start = {n: p.detach().clone() for n, p in named}
    direction = {n: torch.randn(p.shape, generator=gen) for n, p in named}
    for t in range(1, steps + 1):
        with torch.no_grad():
            for n, p in named:
                p.copy_(start[n] + direction[n] * (t / steps))
        method.after_optimizer_step()
    return {n: (start[n], direction[n]) for n in start}


def measured_fraction(method, paths) -> float:
    num = sum(((method.ema[n] - s) * d).sum() for n, (s, d) in paths.items())
    den = sum((d * d).sum() for _, (_, d) in paths.items())
    return float(num / den)


@pytest.mark.parametrize("horizon", [0.25, 0.5, 1.0])
def test_fixed_horizon_averages_over_the_task(horizon):
    steps = 120
    model = tiny_model()
    method = build_method("mage", MethodConfig(pema_mode="fixed", pema_horizon=horizon), model)
    method.steps_in_task = steps
    method.on_task_start(GROUPS)
    beta = 1 - 1 / (horizon * steps)
    assert method.pema_kwargs["fixed_beta"] == pytest.approx(beta)
    assert not any(m.track_fisher for _, m in iter_multi_lora(model))  # fixed reads no Fisher
    paths = walk_linear_path(method, model, steps)
    got = measured_fraction(method, paths)
    assert got == pytest.approx(kept_fraction_of_linear_path(beta, steps), abs=1e-5)
    # An average over a fraction h of the task: about 1 - h (1 - e^(-1/h)) of the change, far from a lag's ~1.
    assert got == pytest.approx(1 - horizon * (1 - torch.exp(torch.tensor(-1 / horizon)).item()), abs=0.02)


def test_fixed_without_horizon_is_the_short_lag():
    steps = 500
    model = tiny_model()
    method = build_method("mage", MethodConfig(pema_mode="fixed", fixed_beta=0.99, pema_horizon=0.0), model)
    method.steps_in_task = steps
    method.on_task_start(GROUPS)
    paths = walk_linear_path(method, model, 100)  # 100 of the 500 steps are enough to see the lag
    assert measured_fraction(method, paths) == pytest.approx(kept_fraction_of_linear_path(0.99, 100), abs=1e-5)


def test_horizon_needs_the_task_length():
    method = build_method("mage", MethodConfig(pema_mode="fixed", pema_horizon=0.5), tiny_model())
    with pytest.raises(ValueError, match="steps"):
        method.on_task_start(GROUPS)


def _inject_fisher(model, per_example: float, count: int = 4) -> None:
    """As if a backward over `count` examples had left a per-example Fisher of `per_example` everywhere."""
    for _, m in iter_multi_lora(model):
        m.fisher_A.fill_(per_example * count)
        m.fisher_B.fill_(per_example * count)
        m.fisher_count.fill_(count)


def _fisher_task(method, model, steps: int, fisher: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    method.steps_in_task = steps
    method.on_task_start(GROUPS)
    named = method._trainable_lora()
    start = {n: p.detach().clone() for n, p in named}
    direction = {n: torch.randn(p.shape, generator=gen) for n, p in named}
    for t in range(1, steps + 1):
        with torch.no_grad():
            for n, p in named:
                p.copy_(start[n] + direction[n] * (t / steps))
        _inject_fisher(model, fisher)
        method.after_optimizer_step()
    return {n: (start[n], direction[n]) for n in start}


def test_fisher_mode_compares_like_with_like():
    steps, horizon = 60, 0.5
    model = tiny_model()
    method = build_method("mage", MethodConfig(pema_mode="fisher", pema_horizon=horizon), model)
    b = 1 - 1 / (horizon * steps)
    # Task 1: no earlier task, w = 0: the plain EMA of the horizon.
    paths = _fisher_task(method, model, steps, fisher=2e-9, seed=0)
    assert measured_fraction(method, paths) == pytest.approx(kept_fraction_of_linear_path(b, steps), abs=1e-5)
    method.on_task_end()
    # Task 2 with the same per-step Fisher: F_prev (task 1's mean) equals this task's running mean at every
    # step, so w = 1/2 from the first step to the last. A sum over tasks against one step's batch would
    # not give this; a Fisher summed over this task's steps would drive w to 0.
    paths = _fisher_task(method, model, steps, fisher=2e-9, seed=1)
    beta = b + (1 - b) * 0.5
    assert measured_fraction(method, paths) == pytest.approx(kept_fraction_of_linear_path(beta, steps), abs=1e-5)
    method.on_task_end()
    # F_prev is the MEAN over the tasks that trained the entry: (2e-9 + 2e-9) / 2, not their sum.
    _fisher_task(method, model, 3, fisher=8e-9, seed=2)
    method.on_task_end()
    name = next(n for n, _ in lora_group_params(model, GROUPS))
    torch.testing.assert_close(method.fisher_prev[name], torch.full_like(method.fisher_prev[name], 4e-9))
    untrained = next(n for n, _ in lora_group_params(model, (1,)))
    assert not method.fisher_prev[untrained].any()  # groups no task trained keep F_prev = 0


def _random_walk(steps: int, shape=(64,), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return list(torch.cumsum(1e-3 * torch.randn(steps + 1, *shape, generator=gen), 0))


def test_paper_mode_is_the_running_minimum():
    """(g + 1) / (delta (F^2 + lambda)) with |g| < 1 and tiny F is +inf-like for delta > 0, negative otherwise."""
    thetas = _random_walk(200)
    ema = thetas[0].clone()
    gen = torch.Generator().manual_seed(1)
    for theta in thetas[1:]:
        g = 1e-5 * torch.randn(theta.shape, generator=gen)
        pema.pema_update_(ema, theta, g, torch.full_like(theta, 1e-9), mode="paper")
    torch.testing.assert_close(ema, torch.stack(thetas).min(0).values, rtol=0, atol=0)


def test_taylor_mode_keeps_all_of_a_descent_path():
    """On gradient descent of a quadratic every step has g . delta < 0: beta = 0 and the EMA copies theta."""
    target = torch.linspace(-1, 1, 32)
    theta = torch.zeros(32)
    ema = theta.clone()
    for _ in range(50):
        g = theta - target
        theta = theta - 0.05 * g
        g_new = theta - target  # the gradient the step's PEMA update sees
        pema.pema_update_(ema, theta, g_new, torch.full_like(theta, 1e-9), mode="taylor")
    kept = float(((ema - 0) * (theta - 0)).sum() / (theta * theta).sum())
    assert kept == pytest.approx(1.0, abs=1e-6)
