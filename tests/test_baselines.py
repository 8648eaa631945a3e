"""The continual-learning baselines (docs/METHOD.md section 5): EWC, CIA, PGP on the tiny SEED-X."""
from __future__ import annotations

import copy

import pytest
import torch

from mage.lora import set_track_fisher
from mage.methods import METHODS, build_method
from mage.methods.base import lora_group_params
from mage.methods.cia import cia_alpha
from mage.methods.pgp import grow_basis, project_out_
from mage.trainer.config import MethodConfig
from tests.mini_fixtures import write_mini
from tests.test_methods import run_steps, text_batch, tiny_model

ALL = (0, 1, 2, 3)


def batches_of(model, sizes, seed=100):
    """A stand-in for the trainer's task-end batches: fixed batches, whatever n is asked for."""
    fixed = [text_batch(model, b, seed=seed + i) for i, b in enumerate(sizes)]
    return fixed, (lambda n: iter(fixed))


def loss_of(model):
    return lambda batch: model(batch).loss


# ---------------------------------------------------------------------------------------------- EWC

def test_ewc_penalty_value_and_gradient_match_hand_computation():
    model = tiny_model()
    method = build_method("ewc", MethodConfig(name="ewc", ewc_lambda=3.5), model)
    assert method.loss_penalty() is None  # nothing to protect before the first task ends
    gen = torch.Generator().manual_seed(1)
    method.fisher = {n: torch.rand(p.shape, generator=gen) for n, p in method.named}
    method.anchor = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen) for n, p in method.named}
    penalty = method.loss_penalty()
    expected = 0.0
    for n, p in method.named:
        d = p.detach().double() - method.anchor[n].double()
        expected += float((method.fisher[n].double() * d * d).sum())
    expected *= 0.5 * 3.5
    torch.testing.assert_close(penalty.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    penalty.backward()
    for n, p in method.named:
        ref = 3.5 * method.fisher[n] * (p.detach() - method.anchor[n])
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-7)


def _per_example_fisher_mean(model, batches):
    """(1/N) sum_n (dL_n/dθ)^2 over every LoRA group, one backward per example: the definition."""
    set_track_fisher(model, False)
    named = list(lora_group_params(model))
    total = [torch.zeros_like(p, dtype=torch.float64) for _, p in named]
    count = 0
    for batch in batches:
        for n in range(batch["input_ids"].shape[0]):
            one = {k: v[n:n + 1] for k, v in batch.items()}
            for t, g in zip(total, torch.autograd.grad(model(one).loss, [p for _, p in named])):
                t += g.double().square()
            count += 1
    return {name: (t / count).float() for (name, _), t in zip(named, total)}


def test_ewc_fisher_is_mean_squared_per_example_gradient_last_or_online():
    model = tiny_model()
    online = build_method("ewc", MethodConfig(name="ewc", ewc_online=True, ewc_samples=3), model)
    online.on_task_start((0,))
    model.eval()
    fixed, batches = batches_of(model, (2, 1))
    online.on_task_end_data(batches, loss_of(model))
    expected = _per_example_fisher_mean(model, fixed)
    for name, _ in online.named:
        ref = expected[name]
        torch.testing.assert_close(online.fisher[name], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item() + 1e-30)
    assert all(torch.equal(online.anchor[n], p.detach()) for n, p in online.named)
    assert all(not m.track_fisher and m.example_scale is None and not m.fisher_count for m in online.modules)
    assert all(p.grad is None for _, p in online.named)  # the pass leaves no gradients behind
    # A second task's Fisher replaces the first (the references' default) or adds to it (online).
    first = {n: f.clone() for n, f in online.fisher.items()}
    second = batches_of(model, (1,), seed=300)[1]
    online.on_task_end_data(second, loss_of(model))
    last = build_method("ewc", MethodConfig(name="ewc", ewc_samples=1), model)
    last.fisher = dict(first)
    last.on_task_end_data(second, loss_of(model))
    assert any(not torch.equal(last.fisher[n], first[n]) for n in first)
    for n in first:
        torch.testing.assert_close(online.fisher[n], first[n] + last.fisher[n], rtol=1e-6, atol=0)


def test_ewc_penalty_reaches_the_gradient_on_task_two_and_state_round_trips():
    model = tiny_model()
    cfg = MethodConfig(name="ewc", ewc_lambda=1e6)
    method = build_method("ewc", cfg, model)
    method.on_task_start((0,))
    method.on_task_end()
    model.eval()
    method.on_task_end_data(batches_of(model, (3,))[1], loss_of(model))
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert len(state) == 2 * len(method.named)
    # Move away from θ*: the penalty's gradient λ F (θ - θ*) adds to the task gradient.
    with torch.no_grad():
        for _, p in method.named:
            p.add_(0.01)
    model.train()
    batch = text_batch(model, 3, seed=7)
    loss = model(batch).loss
    task_grads = torch.autograd.grad(loss, [p for _, p in method.named], retain_graph=True)
    penalty = method.loss_penalty()
    both = torch.autograd.grad(loss + penalty, [p for _, p in method.named])
    for (n, p), g, gb in zip(method.named, task_grads, both):
        ref = g + 1e6 * method.fisher[n] * (p.detach() - method.anchor[n])
        torch.testing.assert_close(gb, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item() + 1e-30)
    assert penalty > 0
    other = build_method("ewc", cfg, copy.deepcopy(model))
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="EWC state does not match"):
        other.load_state_dict({k: v for k, v in state.items() if not k.endswith("lora_A_groups.0")})


# ---------------------------------------------------------------------------------------------- CIA

def test_cia_alpha_rule_on_hand_cases():
    a = torch.tensor([10.0, 1.0, 0.0, 2.0, 4.0])
    b = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    c = torch.tensor([1.0, 1.0, 3.0, 0.0, 1.0])
    # 2*2/10 = 0.4 kept; 2*2/1 = 4 -> 0.01; a = 0 -> inf -> 0.01; 0 * 0 -> inf -> 0.01; 2/4 = 0.5 kept
    expected = torch.tensor([0.4, 0.01, 0.01, 0.01, 0.5])
    torch.testing.assert_close(cia_alpha(a, b, c), expected, rtol=0, atol=1e-7)
    # exactly 1 is outside the open interval
    assert cia_alpha(torch.tensor(4.0), torch.tensor(1.0), torch.tensor(1.0)).item() == pytest.approx(0.01)


def test_cia_averages_from_task_two_and_swaps_at_task_end(monkeypatch):
    model = tiny_model()
    method = build_method("cia", MethodConfig(name="cia"), model)
    run_steps(model, method, steps=1, batch_size=2, accum=1, task_groups=(0,))
    assert method.groups == ALL and not method.ema  # task 1: plain LoRA
    trained = {n: p.detach().clone() for n, p in method.named}
    method.on_task_end()
    assert all(torch.equal(p, trained[n]) for n, p in method.named) and int(method.tasks_done) == 1

    captured = []
    real = method.after_optimizer_step

    def spy():  # the inputs of each update, read before the method consumes them
        captured.append({n: (method.ema[n].clone(), g.clone(), method.g_prev[n].clone(), p.detach().clone())
                         for (n, p), g in zip(method.named, method._grads)})
        real()

    monkeypatch.setattr(method, "after_optimizer_step", spy)
    run_steps(model, method, steps=2, batch_size=2, accum=1, task_groups=(1,))
    # The method's tensors are each layer's whole stacked A (all four groups) and whole stacked B.
    stacked = {}
    for n in captured[0]:
        layer, kind, _ = n.rsplit(".", 2)
        stacked.setdefault((layer, kind), []).append(n)
    assert all(len(members) == 4 for members in stacked.values())
    ref = {}
    for step in captured:
        for members in stacked.values():
            ema = {n: ref.get(n, step[n][0]).double() for n in members}  # the chain, recomputed in float64
            a = sum(float((step[n][3].double() - ema[n]).abs().sum()) for n in members)
            b = sum(float(step[n][1].double().abs().sum()) for n in members)
            c = sum(float((step[n][1].double() - step[n][2].double()).abs().sum()) for n in members)
            alpha = 2 * (1 + b) / (a * c) if a * c > 0 else float("inf")
            alpha = alpha if 0 < alpha < 1 else 0.01
            for n in members:
                ref[n] = (1 - alpha) * ema[n] + alpha * step[n][3].double()
    assert any(not torch.equal(captured[-1][n][2], torch.zeros_like(captured[-1][n][2])) for n in ref)  # g_prev kept
    for n in ref:
        torch.testing.assert_close(method.ema[n].double(), ref[n], rtol=1e-5, atol=1e-7)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    other = build_method("cia", MethodConfig(name="cia"), copy.deepcopy(model))
    other.on_task_start((1,))  # a fresh process resuming mid-task 2 starts the task before loading
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())
    ema = {n: t.clone() for n, t in method.ema.items()}
    method.on_task_end()
    assert all(torch.equal(p, ema[n].to(p.dtype)) for n, p in method.named)
    assert method.state_dict().keys() == {"tasks_done"} and int(method.tasks_done) == 2


def test_baselines_registered():
    assert {"ewc", "cia", "pgp"} <= set(METHODS)


# ---------------------------------------------------------------------------------------------- PGP

def _gpm_dims_reference(basis, rows, eps):
    """How many directions GPM adds, from the eigenvalues of the residual's covariance (float64)."""
    r = rows.double().T
    u = basis.double()
    total = float(r.square().sum())
    resid = r - u @ (u.T @ r)
    captured = total - float(resid.square().sum())
    energies = torch.linalg.eigvalsh(resid @ resid.T).flip(0).clamp_min(0)
    cum = captured + torch.cumsum(energies, 0)
    return int((cum < eps * total).sum()) + 1


def _structured_rows(m, d, scales, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s = torch.zeros(d, dtype=torch.float64)
    s[: len(scales)] = torch.tensor(scales, dtype=torch.float64)
    return (torch.randn(m, d, generator=gen, dtype=torch.float64) * s) @ q.T


@pytest.mark.parametrize("eps", [0.9, 0.97, 0.999])
def test_gpm_basis_growth_respects_threshold_orthonormality_and_cap(eps):
    d = 24
    rows1 = _structured_rows(40, d, [8.0, 6.0, 3.0, 2.0, 1.0, 0.5, 0.2], seed=0).float()
    empty = torch.zeros(d, 0)
    u1 = grow_basis(empty, rows1, eps, max_dim=d)
    assert u1.shape[1] == _gpm_dims_reference(empty, rows1, eps)
    torch.testing.assert_close(u1.T @ u1, torch.eye(u1.shape[1]), rtol=0, atol=1e-5)
    # The basis holds at least eps of the rows' energy, and one column fewer would not.
    energy = (rows1 @ u1).square().sum() / rows1.square().sum()
    assert energy >= eps - 1e-6
    assert (rows1 @ u1[:, :-1]).square().sum() / rows1.square().sum() < eps + 1e-6
    # A second task: the old span is kept, new columns are orthogonal to it, counted on the residual.
    rows2 = _structured_rows(40, d, [5.0, 4.0, 2.0, 1.0, 0.3], seed=1).float()
    u2 = grow_basis(u1, rows2, eps, max_dim=d)
    assert u2.shape[1] == u1.shape[1] + _gpm_dims_reference(u1, rows2, eps)
    torch.testing.assert_close(u2.T @ u2, torch.eye(u2.shape[1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(u2 @ (u2.T @ u1), u1, rtol=0, atol=1e-5)  # span(u1) inside span(u2)
    # Rows already inside the span add nothing; the cap bounds the size.
    assert grow_basis(u2, rows1 @ u1 @ u1.T, eps, max_dim=d).shape == u2.shape
    assert grow_basis(empty, rows1, eps, max_dim=2).shape[1] == min(2, u1.shape[1])
    assert grow_basis(u2, rows2, 1.0, max_dim=u2.shape[1]).shape == u2.shape


def test_projection_leaves_grad_orthogonal_to_basis():
    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(20, 6, generator=gen))
    grad = torch.randn(5, 20, generator=gen)
    original = grad.clone()
    project_out_(grad, basis)
    torch.testing.assert_close(grad @ basis, torch.zeros(5, 6), rtol=0, atol=1e-5)
    # Only the component in span(U) is removed.
    torch.testing.assert_close(grad, original - original @ basis @ basis.T, rtol=1e-6, atol=1e-6)


def test_pgp_grows_bases_from_activations_and_projects_later_tasks(monkeypatch):
    model = tiny_model()
    cfg = MethodConfig(name="pgp", pgp_samples=2, pgp_tokens_per_example=5, pgp_threshold=0.9, pgp_max_basis=0.25)
    method = build_method("pgp", cfg, model)
    method.on_task_start((0,))
    method.on_task_end()
    model.eval()
    method.on_task_end_data(batches_of(model, (2,))[1], loss_of(model))
    assert all(not m._forward_pre_hooks for m in method.modules)  # the recording hooks are gone
    for name, m in method.lora_layers:
        u = method.bases[name]
        assert 1 <= u.shape[1] <= int(0.25 * m.in_features) and u.shape[1] <= 10  # 2 examples x 5 tokens
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), rtol=0, atol=1e-5)
    projected = []
    real = method.before_clip

    def spy(grad_of):
        real(grad_of)
        projected.append([(name, grad_of(p).clone()) for name, m in method.lora_layers for p in m.lora_A_groups])

    monkeypatch.setattr(method, "before_clip", spy)
    run_steps(model, method, steps=1, batch_size=2, accum=1, task_groups=(2,))
    assert projected
    for name, g in projected[0]:
        assert g.abs().max() > 0
        torch.testing.assert_close(g @ method.bases[name], torch.zeros(g.shape[0], method.bases[name].shape[1]),
                                   rtol=0, atol=1e-6 * g.abs().max().item())
    state = {k: v.clone() for k, v in method.state_dict().items()}
    other = build_method("pgp", cfg, copy.deepcopy(model))
    other.load_state_dict(state)
    assert other.tasks_seen == 1 and all(torch.equal(other.bases[n], b) for n, b in method.bases.items())
    with pytest.raises(ValueError, match="PGP state does not match"):
        other.load_state_dict({"basis.nowhere": torch.zeros(3, 1), "tasks_seen": torch.tensor(1)})


def test_pgp_keeps_old_outputs_a_x_under_adamw_with_weight_decay(monkeypatch):
    import mage.methods.pgp as pgp_mod

    model = tiny_model()
    cfg = MethodConfig(name="pgp", pgp_samples=2, pgp_tokens_per_example=4, pgp_threshold=1.0, pgp_max_basis=1.0)
    method = build_method("pgp", cfg, model)
    rows_seen = {}
    real_grow = pgp_mod.grow_basis

    def spy(basis, rows, threshold, max_dim):  # the activation rows x_old each basis is grown from
        out = real_grow(basis, rows, threshold, max_dim)
        rows_seen[len(rows_seen)] = rows.clone()
        return out

    monkeypatch.setattr(pgp_mod, "grow_basis", spy)
    method.on_task_start((0,))
    method.on_task_end()
    model.eval()
    method.on_task_end_data(batches_of(model, (2,))[1], loss_of(model))
    x_old = {name: rows_seen[i] for i, (name, _) in enumerate(method.lora_layers)}
    gen = torch.Generator().manual_seed(9)
    x_new = {name: torch.randn(3, m.in_features, generator=gen) for name, m in method.lora_layers}
    before = {name: (m.lora_A.detach().clone(), m.lora_A.detach() @ x_old[name].T) for name, m in method.lora_layers}
    run_steps(model, method, steps=3, batch_size=2, accum=1, task_groups=(2,))  # AdamW, weight decay 0.05
    moved_new = 0
    for name, m in method.lora_layers:
        a0, out0 = before[name]
        a1 = m.lora_A.detach()
        assert not torch.equal(a1, a0)  # A trains on the new task ...
        out1 = a1 @ x_old[name].T
        torch.testing.assert_close(out1, out0, rtol=0, atol=1e-5 * out0.abs().max().item())  # ... A x_old stays
        moved_new += int(not torch.allclose(a1 @ x_new[name].T, a0 @ x_new[name].T, atol=1e-5))
    assert moved_new == len(method.lora_layers)  # outside span U the outputs do change


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_mini(tmp_path_factory, ["vqav2", "hqedit"], 4, 1)


def tiny_run(data_root, out, method: str, *extra: str) -> dict:
    from mage.trainer.main import main

    return main(["--data.root", str(data_root), "--data.tasks", "vqav2,hqedit", "--run.out_dir", str(out),
                 "--method.name", method, "--train.steps_per_task", "1", "--train.batch_size", "2",
                 "--train.grad_accum", "1", "--optim.warmup_steps", "0", "--eval.max_examples", "1",
                 "--eval.max_new_tokens", "1", "--eval.zero_shot", "false", "--run.progress", "false",
                 "--run.tensorboard", "false", *extra])


@pytest.mark.parametrize("method, extra", [
    ("ewc", ("--method.ewc_samples", "1", "--method.ewc_lambda", "1e6")),
    ("cia", ()),
    ("pgp", ("--method.pgp_samples", "1", "--method.pgp_tokens_per_example", "3")),
])
def test_baseline_trains_two_tasks_through_the_trainer(data_root, tmp_path, method, extra):
    from safetensors.torch import load_file

    result = tiny_run(data_root, tmp_path / method, method, *extra)
    assert len(result["matrix"]) == 2
    after1 = load_file(tmp_path / method / "checkpoints" / "task01_end.safetensors")
    after2 = load_file(tmp_path / method / "checkpoints" / "task02_end.safetensors")
    state1 = {k: v for k, v in after1.items() if k.startswith("method.")}
    if method == "ewc":  # the Fisher of task 1 and θ*_1 = the weights task 1 ended with
        assert state1 and all(k.startswith(("method.fisher.", "method.anchor.")) for k in state1)
        assert any(v.any() for k, v in state1.items() if k.startswith("method.fisher."))
        anchors = {k[len("method.anchor."):]: v for k, v in state1.items() if k.startswith("method.anchor.")}
        assert all(torch.equal(v, after1[f"model.{n}"].float()) for n, v in anchors.items())
    elif method == "cia":
        assert state1 == {"method.tasks_done": torch.tensor(1)}
        assert after2["method.tasks_done"].item() == 2
    else:  # bases from task 1's activations, grown again after task 2
        assert state1["method.tasks_seen"].item() == 1 and after2["method.tasks_seen"].item() == 2
        bases1 = {k: v for k, v in state1.items() if k.startswith("method.basis.")}
        assert bases1 and all(after2[k].shape[1] >= v.shape[1] for k, v in bases1.items())
