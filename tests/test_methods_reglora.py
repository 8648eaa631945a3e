"""RegLoRA (SEFE): key positions, merge into the base weight, the gathered penalty, exact resume."""
from __future__ import annotations

import math

import pytest
import torch

from mage.lora import iter_multi_lora
from mage.methods import build_method
from mage.methods.reglora import CHUNK, gathered_abs_mean, top_positions
from mage.trainer.config import MethodConfig
from tests.test_methods import run_steps, text_batch, tiny_model


@pytest.mark.parametrize("shape, k", [((7, 3, 11), 9), ((5, 4, 6), 30)])
def test_gathered_abs_mean_matches_materialised_float64(shape, k):
    d_out, r, d_in = shape
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(d_out, r, generator=gen, requires_grad=True)
    A = torch.randn(r, d_in, generator=gen, requires_grad=True)
    flat = torch.randperm(d_out * d_in, generator=gen)[:k].sort().values.to(torch.int32)
    got = gathered_abs_mean(B, A, flat)
    B64, A64 = B.detach().double().requires_grad_(), A.detach().double().requires_grad_()
    ref = (B64 @ A64).flatten()[flat.long()].abs().mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    got.backward()
    ref.backward()
    torch.testing.assert_close(B.grad.double(), B64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(A.grad.double(), A64.grad, rtol=1e-5, atol=1e-7)


def test_gathered_abs_mean_in_chunks(monkeypatch):
    import mage.methods.reglora as reglora

    monkeypatch.setattr(reglora, "CHUNK", 3)
    B, A = torch.randn(4, 2, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    flat = torch.arange(0, 20, 2, dtype=torch.int32)
    got = gathered_abs_mean(B, A, flat)
    torch.testing.assert_close(got, (B @ A).flatten()[flat.long()].abs().mean(), rtol=1e-6, atol=1e-7)
    assert CHUNK > 3


def test_reglora_merges_task_into_base_stores_top_positions_and_penalises_them():
    model = tiny_model()
    cfg = MethodConfig(name="reglora", reglora_lambda=10.0, reglora_top_fraction=0.05)
    method = build_method("reglora", cfg, model)
    assert method.loss_penalty() is None
    run_steps(model, method, steps=2, task_groups=(0,))
    layers = list(iter_multi_lora(model))
    w0 = {n: m.base.weight.detach().clone() for n, m in layers}
    ba = {n: (m.lora_B.detach().double() @ m.lora_A.detach().double()) for n, m in layers}
    model.eval()
    batch = text_batch(model, 2, seed=3)
    before = model(batch).loss.detach()
    method.on_task_end()
    after = model(batch).loss.detach()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)  # the merge keeps the function
    for n, m in layers:
        torch.testing.assert_close(m.base.weight.double(), w0[n].double() + m.scaling * ba[n], rtol=1e-5, atol=1e-6)
        assert not m.lora_B.any() and m.lora_A.abs().max() > 0  # fresh LoRA: B = 0, A random
        k = math.ceil(0.05 * ba[n].numel())
        pos = method.positions[n]
        assert pos.dtype == torch.int32 and pos.numel() == k
        thresh = ba[n].abs().flatten().sort(descending=True).values[k - 1]
        assert bool((ba[n].abs().flatten()[pos.long()] >= thresh - 1e-12).all())
    assert method.loss_penalty().item() == 0.0  # B = 0: nothing at the positions yet
    model.train()
    run_steps(model, method, steps=2, task_groups=(2,))
    penalty = method.loss_penalty()
    ref = torch.stack([(m.lora_B.double() @ m.lora_A.double()).flatten()[method.positions[n].long()].abs().mean()
                       for n, m in layers]).mean() * 10.0
    assert penalty.item() > 0
    torch.testing.assert_close(penalty.double(), ref.detach(), rtol=1e-5, atol=1e-9)
    method.on_task_end()  # a second task: positions accumulate (sorted union)
    for n, _ in layers:
        pos = method.positions[n]
        assert pos.numel() >= math.ceil(0.05 * ba[n].numel()) and bool((pos[1:] > pos[:-1]).all())

    # Resume: a fresh model with the same seed replays the merges to bit-identical base weights.
    state = {k: v.clone() for k, v in method.state_dict().items()}
    fresh = tiny_model()
    other = build_method("reglora", cfg, fresh)
    other.load_state_dict(state)
    for (n, m), (_, f) in zip(layers, iter_multi_lora(fresh)):
        assert torch.equal(m.base.weight, f.base.weight), n
        assert torch.equal(method.positions[n], other.positions[n])
    with pytest.raises(ValueError, match="no merges yet"):
        other.load_state_dict(state)


def test_top_positions_picks_largest_entries():
    B = torch.tensor([[1.0], [0.1]])
    A = torch.tensor([[3.0, -5.0, 0.2]])
    assert top_positions(B, A, 2 / 6).tolist() == [0, 1]
