"""LAE: the offline EMA copy lags the online model; decoding takes the max of both distributions."""
from __future__ import annotations

import copy

import pytest
import torch

from mage.methods import build_method
from mage.methods.lae_decoding import swapped_weights
from mage.trainer.config import MethodConfig
from tests.test_methods import run_steps, text_batch, tiny_model


def test_offline_copy_starts_at_task_two_follows_by_ema_and_is_never_reset(monkeypatch):
    model = tiny_model()
    method = build_method("lae", MethodConfig(name="lae", lae_momentum=0.6), model)
    run_steps(model, method, steps=1, task_groups=(0,))
    assert not method.offline and method.generator() is None  # task 1: online only
    method.on_task_end()
    after1 = {n: p.detach().float().clone() for n, p in method.named}
    thetas = []
    real = method.after_optimizer_step

    def spy():
        thetas.append({n: p.detach().float().clone() for n, p in method.named})
        real()

    monkeypatch.setattr(method, "after_optimizer_step", spy)
    run_steps(model, method, steps=3, task_groups=(2,))
    ref = {n: t.double() for n, t in after1.items()}
    for theta in thetas:
        for n in ref:
            ref[n] = 0.6 * ref[n] + 0.4 * theta[n].double()
    for n, p in method.named:
        torch.testing.assert_close(method.offline[n].double(), ref[n], rtol=1e-6, atol=1e-7)
    lags = [n for n, p in method.named if not torch.equal(method.offline[n], p.detach().float())]
    assert len(lags) > len(method.named) // 2  # the copy lags the online weights
    # Task 3 continues the same copy (no reset at a task start) and it survives a state round trip.
    method.on_task_end()
    kept = {n: t.clone() for n, t in method.offline.items()}
    method.on_task_start((1,))
    assert all(torch.equal(method.offline[n], kept[n]) for n in kept)
    other = build_method("lae", MethodConfig(name="lae", lae_momentum=0.6), copy.deepcopy(model))
    other.load_state_dict({k: v.clone() for k, v in method.state_dict().items()})
    assert int(other.tasks_done) == 2 and all(torch.equal(other.offline[n], kept[n]) for n in kept)


def _setup_two_models():
    model = tiny_model()
    method = build_method("lae", MethodConfig(name="lae"), model)
    method.tasks_done += 1
    method.on_task_start((0,))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # an offline copy far from the online weights, so the two models disagree
        for n, p in method.named:
            method.offline[n] += 0.5 * p.detach().float().std().nan_to_num() * torch.randn(p.shape, generator=gen)
    model.eval()
    return model, method


def test_decoding_takes_elementwise_max_of_both_distributions_with_two_caches():
    model, method = _setup_two_models()
    decoder = method.generator()
    batch = text_batch(model, 8, length=6, seed=11)  # rows enough that each model wins somewhere
    steps = 5
    eos = -1  # never ends early: every step is compared
    tokens = decoder.greedy_tokens(batch, steps, eos=eos, pad=0)
    assert tokens.shape == (8, steps)
    # Reference without caches: the whole sequence again through each model at every step.
    params = [p for _, p in method.named]
    offline = [method.offline[n].to(p.dtype) for n, p in method.named]
    ids = batch["input_ids"]
    used_online = used_offline = False
    with torch.no_grad():
        for step in range(steps):
            mask = torch.ones_like(ids)
            on = torch.softmax(model.llm(input_ids=ids, attention_mask=mask).logits[:, -1].float(), -1)
            with swapped_weights(params, offline):
                off = torch.softmax(model.llm(input_ids=ids, attention_mask=mask).logits[:, -1].float(), -1)
            nxt = torch.maximum(on, off).argmax(-1)
            assert torch.equal(tokens[:, step], nxt), step
            used_online |= bool((on.max(-1).values > off.max(-1).values).any())
            used_offline |= bool((off.max(-1).values > on.max(-1).values).any())
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    assert used_online and used_offline  # tokens came from each of the two models
    assert all(torch.equal(p, q) for p, q in zip(params, [p for _, p in method.named]))  # weights restored


def test_image_features_are_the_mean_of_both_models(monkeypatch):
    model, method = _setup_two_models()
    decoder = method.generator()
    calls = []

    def fake(batch):  # the feature generator sees whichever weights are in place
        calls.append(model.output_resampler.embed_dim)
        return next(p for n, p in method.named if n.startswith("output_resampler")).detach().float().sum().reshape(1)

    monkeypatch.setattr(model, "generate_image_features", fake)
    got = decoder.generate_image_features({})
    name = next(n for n, _ in method.named if n.startswith("output_resampler"))
    online = dict(method.named)[name].detach().float().sum()
    offline = method.offline[name].sum()
    torch.testing.assert_close(got, ((online + offline) / 2).reshape(1), rtol=1e-6, atol=1e-6)
    assert len(calls) == 2


def test_momentum_is_checked():
    with pytest.raises(ValueError, match="lae_momentum"):
        build_method("lae", MethodConfig(name="lae", lae_momentum=1.0), tiny_model())
