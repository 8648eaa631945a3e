"""Methods on the tiny SEED-X: group masking, per-example Fisher scale, PEMA, task-end consolidation."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import re

import pytest
import torch

from mage import pema
from mage.lora import iter_multi_lora, set_track_fisher, wrap_llama_lora
from mage.methods import METHODS, build_method, unread_config_fields
from mage.methods.base import lora_group_params
from mage.model import build_model
from mage.trainer.config import MethodConfig, OptimConfig, TrainConfig
from mage.trainer.distributed import DistInfo
from mage.trainer.engine import DDPEngine


def tiny_model(dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("tiny", device="cpu")
    model.freeze_for_sft()
    wrap_llama_lora(model.llm, rank=2, num_groups=4, alpha=8.0, dropout=dropout, backend="eager")
    # B = 0 at init makes the A gradient vanish; give B values so every path is exercised.
    with torch.no_grad():
        for _, m in iter_multi_lora(model):
            for b in m.lora_B_groups:
                b.normal_(0, 0.05)
    return model


def text_batch(model, batch_size: int, length: int = 7, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.llm.config.vocab_size
    ids = torch.randint(5, min(vocab, 200), (batch_size, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def run_steps(model, method, steps: int, batch_size: int = 3, accum: int = 2, task_groups=(0, 3), lr=1e-2):
    method.on_task_start(task_groups)
    engine = DDPEngine(model, method.param_groups(0.05), OptimConfig(lr=lr, warmup_steps=0),
                       TrainConfig(grad_accum=accum), steps, DistInfo(0, 1, 0, torch.device("cpu")))
    model.train()
    for s in range(steps):
        for micro in range(accum):
            method.before_backward(batch_size, accum)
            out = engine.forward(text_batch(model, batch_size, seed=s * 10 + micro))
            engine.backward(out.loss, micro == accum - 1)
        method.before_clip(engine.grad_of)
        engine.clip()
        engine.step()
        method.after_optimizer_step()
    return engine


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="valid methods: cia, ew, ew_ga, ewc, joint, lae, lora, mage, moelora, pgp, "
                                         "reglora, zero_shot"):
        build_method("mage2", MethodConfig(), tiny_model())


SHARED_FIELDS = {"name", "train_non_lora", "train_embeddings", "train_input_resampler"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_field_a_method_reads_is_declared(name):
    """A run is compared with its checkpoint or an earlier table's run on its declared fields only
    (`unread_config_fields`); a field read but not declared would let a changed setting pass unnoticed."""
    cls = METHODS[name]
    read = set()
    for klass in cls.__mro__[:-1]:  # the class and its bases, without object
        read |= set(re.findall(r"\bcfg\.([a-z_]+)", inspect.getsource(klass)))
    assert read - SHARED_FIELDS <= set(cls.config_fields), (name, read - SHARED_FIELDS - set(cls.config_fields))
    assert not {f"method.{f}" for f in read} & unread_config_fields(name)
    assert set(cls.config_fields) <= {f.name for f in dataclasses.fields(MethodConfig)}


def test_mage_frozen_groups_bit_identical_and_absent_from_optimizer():
    model = tiny_model()
    method = build_method("mage", MethodConfig(), model)
    frozen_before = {n: p.detach().clone() for n, p in lora_group_params(model, (1, 2))}
    trained_before = {n: p.detach().clone() for n, p in lora_group_params(model, (0, 3))}
    extras_before = {n: p.detach().clone() for n, p in method.extras}
    engine = run_steps(model, method, steps=3)
    in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    for n, p in lora_group_params(model, (1, 2)):
        assert torch.equal(p, frozen_before[n]), n
        assert id(p) not in in_optimizer and p.grad is None and not p.requires_grad
    for _, p in lora_group_params(model, (0, 3)):
        assert id(p) in in_optimizer
    # The training changed the trained groups and the non-LoRA trainables (embeddings, norms, ...).
    assert any(not torch.equal(p, trained_before[n]) for n, p in lora_group_params(model, (0, 3)))
    assert any(not torch.equal(p, extras_before[n]) for n, p in method.extras)
    names = {n for n, _ in method.extras}
    assert "patch_pos_embed" in names and any("embed_tokens" in n for n in names)
    assert not any(n.startswith("visual_encoder.") for n in names)


@pytest.mark.parametrize("switch, prefixes", [("train_embeddings", ("llm.model.embed_tokens.", "llm.lm_head.")),
                                              ("train_input_resampler", ("input_resampler.",))])
def test_a_switched_off_trainable_is_frozen_and_left_out_of_the_optimizer(switch, prefixes):
    model = tiny_model()
    method = build_method("lora", MethodConfig(**{switch: False}), model)
    switched_off = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefixes)}
    assert switched_off, f"the tiny model has no parameter under {prefixes}"
    names = {n for n, _ in method.extras}
    assert not names & switched_off.keys()
    assert "patch_pos_embed" in names and any(n.startswith("output_resampler.") for n in names)
    engine = run_steps(model, method, steps=2)
    in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        if n in switched_off:
            assert torch.equal(p, switched_off[n]) and not p.requires_grad and id(p) not in in_optimizer, n


def _per_example_fisher(model, batches):
    """sum_n (dL_n/dθ)^2 by one backward per example: the definition (docs/METHOD.md section 3, Eq. 2), no tricks."""
    set_track_fisher(model, False)
    params = [p for _, p in lora_group_params(model, (0, 3))]
    total = [torch.zeros_like(p) for p in params]
    for batch in batches:
        for n in range(batch["input_ids"].shape[0]):
            one = {k: v[n:n + 1] for k, v in batch.items()}
            grads = torch.autograd.grad(model(one).loss, params)
            for t, g in zip(total, grads):
                t += g.double().square().float()
    return dict(zip([n for n, _ in lora_group_params(model, (0, 3))], total))


def test_fisher_uses_per_example_gradients_with_accumulation():
    model = tiny_model()
    method = build_method("mage", MethodConfig(pema_mode="paper"), model)
    method.on_task_start((0, 3))
    model.train()
    batches = [text_batch(model, 3, seed=i) for i in range(2)]
    for b in batches:
        method.before_backward(3, 2)
        (model(b).loss / 2).backward()
    expected = _per_example_fisher(model, batches)
    for name, m in iter_multi_lora(model):
        assert m.fisher_count.item() == 6  # examples of the whole step
        for g in (0, 3):
            fa, fb = method._fisher_slices(m, g, m.fisher_A, m.fisher_B)
            for got, key in ((fa, f"{name}.lora_A_groups.{g}"), (fb, f"{name}.lora_B_groups.{g}")):
                ref = expected[key]
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item() + 1e-30)
        for g in (1, 2):  # frozen groups accumulate nothing
            fa, fb = method._fisher_slices(m, g, m.fisher_A, m.fisher_B)
            assert not fa.any() and not fb.any()


@pytest.mark.parametrize("mode", ["paper", "fixed", "fisher"])
def test_pema_step_matches_reference_and_task_end_takes_ema(mode, monkeypatch):
    model = tiny_model()
    method = build_method("mage", MethodConfig(pema_mode=mode, fixed_beta=0.9), model)
    captured = {}
    real = method.after_optimizer_step

    def spy():  # the inputs of the PEMA update, read before the method consumes them
        named = method._trainable_lora()
        captured["ema"] = {n: method.ema[n].clone() for n, _ in named}
        captured["grad"] = {n: g.clone() for (n, _), g in zip(named, method._grads)}
        fish = {}
        for name, m in iter_multi_lora(model):
            for g in method.groups:
                fa, fb = method._fisher_slices(m, g, m.fisher_A, m.fisher_B)
                count = m.fisher_count.float()
                fish[f"{name}.lora_A_groups.{g}"], fish[f"{name}.lora_B_groups.{g}"] = fa / count, fb / count
        captured["fisher"] = fish
        real()

    monkeypatch.setattr(method, "after_optimizer_step", spy)
    run_steps(model, method, steps=1)
    for n, p in method._trainable_lora():
        ref = captured["ema"][n].clone()
        prev = torch.zeros_like(ref) if mode == "fisher" else None
        pema.pema_update_(ref, p, captured["grad"][n], captured["fisher"][n], mode=mode, fixed_beta=0.9,
                          fisher_prev=prev)
        torch.testing.assert_close(method.ema[n], ref, rtol=0, atol=0)
    ema = {n: t.clone() for n, t in method.ema.items()}
    method.on_task_end()
    for n, p in lora_group_params(model, (0, 3)):
        assert torch.equal(p, ema[n])
    if mode == "fisher":
        state = method.state_dict()
        key = next(k for k in state if k.startswith("fisher_prev.") and k.endswith("lora_A_groups.0"))
        assert state[key].abs().sum() > 0


def test_grad_given_to_pema_is_unclipped():
    model = tiny_model()
    method = build_method("mage", MethodConfig(pema_mode="taylor"), model)
    method.on_task_start((0, 3))
    engine = DDPEngine(model, method.param_groups(0.0), OptimConfig(lr=1e-2, grad_clip=1e-6, warmup_steps=0),
                       TrainConfig(grad_accum=1), 1, DistInfo(0, 1, 0, torch.device("cpu")))
    method.before_backward(3, 1)
    engine.backward(model(text_batch(model, 3)).loss, True)
    raw = [p.grad.clone() for _, p in method._trainable_lora()]
    method.before_clip(engine.grad_of)
    engine.clip()
    clipped = [p.grad for _, p in method._trainable_lora()]
    assert all(torch.equal(a, b) for a, b in zip(method._grads, raw))
    assert not all(torch.equal(a, b) for a, b in zip(raw, clipped))


def test_lora_trains_all_groups_without_ema_and_ew_ga_keeps_trained_values():
    model = tiny_model()
    method = build_method("lora", MethodConfig(name="lora"), model)
    before = {n: p.detach().clone() for n, p in lora_group_params(model)}
    run_steps(model, method, steps=2, task_groups=(0,))
    assert method.groups == (0, 1, 2, 3) and method.state_dict() == {}
    changed = {n for n, p in lora_group_params(model) if not torch.equal(p, before[n])}
    assert all(any(f"groups.{g}" in n for n in changed) for g in range(4))

    model = tiny_model()
    method = build_method("ew_ga", MethodConfig(name="ew_ga"), model)
    run_steps(model, method, steps=2)
    trained = {n: p.detach().clone() for n, p in lora_group_params(model)}
    method.on_task_end()
    assert all(torch.equal(p, trained[n]) for n, p in lora_group_params(model))
    assert set(METHODS) == {"mage", "lora", "ew", "ew_ga", "ewc", "cia", "pgp", "moelora", "lae", "reglora", "joint",
                            "zero_shot"}


def test_mage_state_round_trip_mid_task():
    model = tiny_model()
    method = build_method("mage", MethodConfig(pema_mode="fisher"), model)
    run_steps(model, method, steps=2)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    other = build_method("mage", MethodConfig(pema_mode="fisher"), copy.deepcopy(model))
    other.on_task_start((0, 3))
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    wrong = build_method("mage", MethodConfig(pema_mode="fisher"), copy.deepcopy(model))
    wrong.on_task_start((0, 1, 2))
    with pytest.raises(ValueError, match="trainable groups"):
        wrong.load_state_dict(state)
