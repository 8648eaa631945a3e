"""A step whose loss or gradient is not finite is skipped by the trainer: optimizer, EMA, Fisher and method
state stay as they were, the schedule advances, it is logged and counted, and too many stop the run."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mage.lora import iter_multi_lora
from mage.trainer.engine import DDPEngine
from mage.trainer.loop import NonFiniteStepsError, SequenceTrainer
from mage.trainer.main import main
from tests.mini_fixtures import write_mini

TASK = "vqav2"
STEPS, ACCUM, BAD_STEP = 5, 2, 2  # 0-based index of the step whose loss or gradient is made non-finite


class _NaNGradient(torch.autograd.Function):
    """Identity in forward (the loss stays finite); NaN gradient in backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy * float("nan")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_mini(tmp_path_factory, [TASK], 12, 2)


def args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--data.root", str(data_root), "--data.tasks", TASK, "--run.out_dir", str(out),
            "--train.steps_per_task", str(STEPS), "--train.batch_size", "2", "--train.grad_accum", str(ACCUM),
            "--optim.warmup_steps", "0", "--eval.max_examples", "2", "--eval.max_new_tokens", "2",
            "--eval.zero_shot", "false", "--run.progress", "false", "--run.tensorboard", "false",
            "--method.pema_mode", "fisher", *extra]


def inject(monkeypatch, kind: str, bad_steps: set[int]) -> list[dict]:
    """Make the first micro-batch of each step in ``bad_steps`` non-finite; snapshot the state at every step start."""
    snapshots: list[dict] = []
    trainer: dict[str, SequenceTrainer] = {}
    real_train_task, real_forward = SequenceTrainer._train_task, DDPEngine.forward

    def spy_train_task(self, k):
        trainer["t"] = self
        return real_train_task(self, k)

    calls = [0]

    def forward(self, batch):
        step, micro = divmod(calls[0], ACCUM)
        calls[0] += 1
        if micro == 0:
            method = trainer["t"].method
            snapshots.append({
                "params": torch.cat([p.detach().reshape(-1).clone() for _, p in method.trainable_named_parameters()]),
                "ema": torch.cat([t.reshape(-1).clone() for t in method.ema.values()]),
                "opt_steps": [float(s["step"]) for s in self.optimizer.state.values()],
                "lr_epoch": self.scheduler.last_epoch,
                "fisher": sum(float(m.fisher_A.abs().sum() + m.fisher_B.abs().sum() + m.fisher_count)
                              for _, m in iter_multi_lora(self.module)),
            })
        out = real_forward(self, batch)
        if step in bad_steps and micro == 0:
            loss = out.loss * float("nan") if kind == "loss" else _NaNGradient.apply(out.loss)
            out = dataclasses.replace(out, loss=loss)
        return out

    monkeypatch.setattr(SequenceTrainer, "_train_task", spy_train_task)
    monkeypatch.setattr(DDPEngine, "forward", forward)
    return snapshots


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_leaves_state_untouched(data_root, tmp_path, monkeypatch, capsys, kind):
    snaps = inject(monkeypatch, kind, {BAD_STEP})
    result = main(args(data_root, tmp_path / "run"))
    assert len(snaps) == STEPS and len(result["matrix"]) == 1
    before, after = snaps[BAD_STEP], snaps[BAD_STEP + 1]
    # The skipped step changed no weight, EMA value or optimizer moment count ...
    assert torch.equal(before["params"], after["params"]) and torch.equal(before["ema"], after["ema"])
    assert before["opt_steps"] == after["opt_steps"] == [float(BAD_STEP)] * len(before["opt_steps"])
    # ... while the steps around it did (so the comparison above can fail).
    assert not torch.equal(snaps[BAD_STEP - 1]["params"], before["params"])
    assert not torch.equal(after["params"], snaps[BAD_STEP + 2]["params"])
    assert not torch.equal(after["ema"], snaps[BAD_STEP + 2]["ema"])
    assert snaps[-1]["opt_steps"][0] == STEPS - 2  # steps 0..4 less the skipped one, before the last
    # The schedule is indexed by the task's step: it advances over the skipped step too.
    assert [s["lr_epoch"] for s in snaps] == list(range(STEPS))
    # The Fisher that backward accumulated from the bad step is discarded, not carried into the next one.
    assert after["fisher"] == 0.0
    assert all(torch.isfinite(s["params"]).all() and torch.isfinite(s["ema"]).all() for s in snaps)
    out = capsys.readouterr().out
    assert out.count("non-finite loss or gradient, step skipped") == 1
    assert "step 3: non-finite" in out and "(1 in this task; train.max_nonfinite_steps=10)" in out


def test_too_many_nonfinite_steps_stop_the_run(data_root, tmp_path, monkeypatch):
    inject(monkeypatch, "loss", {1, 3})
    with pytest.raises(NonFiniteStepsError, match=r"2 steps with a non-finite loss or gradient \(the last at step 4\), "
                                                  r"more than train.max_nonfinite_steps=1"):
        main(args(data_root, tmp_path / "run", "--train.max_nonfinite_steps", "1"))


def test_zero_allows_no_nonfinite_step(data_root, tmp_path, monkeypatch):
    inject(monkeypatch, "grad", {0})
    with pytest.raises(NonFiniteStepsError, match="train.max_nonfinite_steps=0"):
        main(args(data_root, tmp_path / "run", "--train.max_nonfinite_steps", "0"))


def test_negative_limit_is_a_config_error():
    from mage.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="max_nonfinite_steps must be >= 0"):
        load_config("mini", {"train.max_nonfinite_steps": "-1"})


@pytest.mark.gpu
def test_the_check_is_the_steps_only_host_sync():
    """On CUDA: ``step_is_finite`` syncs once; clipping, the optimizer step and a skip add none."""
    import warnings

    from mage.methods import build_method
    from mage.trainer.config import MethodConfig, OptimConfig, TrainConfig
    from mage.trainer.distributed import DistInfo
    from tests.test_methods import text_batch, tiny_model

    device = torch.device("cuda")
    model = tiny_model(seed=0).to(device)
    method = build_method("mage", MethodConfig(pema_mode="fisher"), model)  # the mode with the most device work
    method.on_task_start((0, 1, 2))
    engine = DDPEngine(model, method.param_groups(0.05), OptimConfig(), TrainConfig(grad_accum=1), 4,
                       DistInfo(0, 1, 0, device))

    def syncs(fn):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return result, sum("synchroniz" in str(w.message) for w in caught)

    for kind in ("finite", "nan"):
        method.before_backward(2, 1)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in text_batch(model, 2, seed=1).items()}
        loss = engine.forward(batch).loss
        loss = loss * float("nan") if kind == "nan" else loss
        engine.backward(loss, True)
        finite, n = syncs(lambda: engine.step_is_finite(loss.detach()))
        assert finite == (kind == "finite") and n == 1
        if finite:
            _, n = syncs(lambda: (engine.clip(), engine.step()))
        else:
            _, n = syncs(engine.skip_step)
        assert n == 0
