"""MoELoRA: the per-token group gate of MultiLoRALinear against float64, and the method on the tiny SEED-X."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from mage import lora as lora_mod
from mage.lora import MultiLoRALinear, iter_multi_lora
from mage.lora_function import dropout_mask
from mage.methods import build_method
from mage.methods.base import lora_group_params
from mage.methods.moelora import SoftmaxRouter
from mage.trainer.config import MethodConfig
from tests.test_methods import run_steps, tiny_model


def _layer(d_in=13, d_out=11, rank=3, groups=4, dropout=0.0, backend="eager", seed=0):
    torch.manual_seed(seed)
    layer = MultiLoRALinear(torch.nn.Linear(d_in, d_out), rank=rank, num_groups=groups, alpha=6.0, dropout=dropout,
                            backend=backend)
    with torch.no_grad():
        for b in layer.lora_B_groups:
            b.normal_(0, 0.3)
    layer.group_gate = SoftmaxRouter(d_in, groups)
    return layer


def _reference(layer, x, mask):
    """float64, one expert at a time: W0 x + b + sum_i softmax(W_r x)_i * s * B_i A_i drop(x)."""
    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    x64, w_r = d(x), d(layer.group_gate.proj.weight)
    a = [d(p) for p in layer.lora_A_groups]
    b = [d(p) for p in layer.lora_B_groups]
    gate = torch.softmax(x64 @ w_r.T, dim=-1)
    xl = x64 * mask.double()
    y = x64 @ layer.base.weight.double().T + layer.base.bias.double()
    for i in range(layer.num_groups):
        y = y + gate[..., i:i + 1] * layer.scaling * ((xl @ a[i].T) @ b[i].T)
    return y, x64, w_r, a, b


@pytest.mark.parametrize("dropout, shape", [(0.0, (2, 5)), (0.3, (3, 4)), (0.0, (7,))])
def test_gated_layer_matches_float64_reference_with_router_gradient(dropout, shape):
    layer = _layer(dropout=dropout)
    layer.train()
    x = torch.randn(*shape, 13, requires_grad=True)
    torch.manual_seed(5)  # the layer draws its dropout seed from torch's generator
    y = layer(x)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout > 0 else 0
    mask = dropout_mask(x.shape, dropout, seed, x.device, torch.float32) if dropout > 0 else torch.ones_like(x)
    ref, x64, w_r, a, b = _reference(layer, x, mask)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.group_gate.proj.weight.grad.double(), w_r.grad, rtol=1e-5, atol=1e-6)
    assert w_r.grad.abs().max() > 1e-4  # the router really gets a gradient
    for i in range(layer.num_groups):
        torch.testing.assert_close(layer.lora_A_groups[i].grad.double(), a[i].grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.lora_B_groups[i].grad.double(), b[i].grad, rtol=1e-5, atol=1e-6)


class _Ones(torch.nn.Module):
    def forward(self, x):
        return torch.ones(*x.shape[:-1], 4, dtype=x.dtype)


def test_gate_of_ones_is_the_ungated_layer_and_fisher_is_refused():
    layer = _layer()
    x = torch.randn(2, 3, 13)
    plain = copy.deepcopy(layer)
    plain.group_gate = None
    layer.group_gate = _Ones()
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-6, atol=1e-6)
    layer.track_fisher = True
    with pytest.raises(RuntimeError, match="Fisher is not computed on the gated"):
        layer(x)


def test_triton_backend_with_a_gate_warns_once_and_runs_eager(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(lora_mod, "_GATE_FALLBACK_WARNED", False)
    fused = _layer(backend="triton")
    eager = copy.deepcopy(fused)
    eager.backend = "eager"
    x = torch.randn(2, 3, 13)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = fused(x)
        fused(x)
    assert sum("group gate runs the eager gated path" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(y1, eager(x), rtol=0, atol=0)


def test_moelora_trains_router_and_every_expert_and_nothing_else():
    model = tiny_model()
    method = build_method("moelora", MethodConfig(name="moelora"), model)
    routers = dict(method.router_parameters())
    assert len(routers) == len(method.modules) and all(m.group_gate is not None for m in method.modules)
    before_r = {n: p.detach().clone() for n, p in routers.items()}
    before_lora = {n: p.detach().clone() for n, p in lora_group_params(model)}
    base = {n: m.base.weight.detach().clone() for n, m in iter_multi_lora(model)}
    engine = run_steps(model, method, steps=2, task_groups=(0,))
    in_opt = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in routers.values())
    assert all(not torch.equal(p, before_r[n]) for n, p in routers.items())  # every router moved
    changed = {n for n, p in lora_group_params(model) if not torch.equal(p, before_lora[n])}
    assert all(any(f"groups.{g}" in n for n in changed) for g in range(4))  # every expert trains
    assert all(torch.equal(m.base.weight, base[n]) for n, m in iter_multi_lora(model))
    # The gate is a softmax: per token the experts' weights sum to one.
    x = torch.randn(2, 3, method.modules[0].in_features)
    torch.testing.assert_close(method.modules[0].group_gate(x).sum(-1), torch.ones(2, 3))
    state = {k: v.clone() for k, v in method.state_dict().items()}
    other = build_method("moelora", MethodConfig(name="moelora"), tiny_model(seed=1))
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="MoELoRA state does not match"):
        other.load_state_dict({})


def test_gated_path_with_float32_adapters_over_a_bf16_base():
    torch.manual_seed(0)
    layer = MultiLoRALinear(torch.nn.Linear(13, 11).to(torch.bfloat16), rank=3, num_groups=4, alpha=6.0)
    layer.lora_A_groups.float()
    layer.lora_B_groups.float()
    with torch.no_grad():
        for b in layer.lora_B_groups:
            b.normal_(0, 0.3)
    layer.group_gate = SoftmaxRouter(13, 4)  # float32 router on bf16 activations
    layer.group_gate.proj.to(torch.bfloat16)
    x = torch.randn(2, 5, 13).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref, *_ = _reference(layer, x.float(), torch.ones(2, 5, 13))
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    y.float().sum().backward()
    assert layer.group_gate.proj.weight.grad is not None and layer.lora_A_groups[0].grad.dtype == torch.float32
