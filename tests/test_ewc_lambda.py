"""EWC's lambda: at the configured default the penalty's gradient is of the order of the task's gradient
(measured the way benchmarks/ewc_lambda_sweep.py measures it), and the measurement itself is right."""
from __future__ import annotations

import statistics

import pytest
import torch

from mage.trainer.config import MethodConfig, load_config
from mage.trainer.distributed import DistInfo
from mage.trainer.loop import SequenceTrainer
from tests.benchmark_modules import load_benchmark
from tests.mini_fixtures import write_mini


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_mini(tmp_path_factory, ["vqav2", "imagenet"], 16, 1)


def _ratios(data_root, out, lam, steps=12):
    # The mini preset's optimiser (its lr, clip 1, AdamW), random-init tiny model, seed 7 (not a table seed).
    cfg = load_config("mini", {"data.root": str(data_root), "data.tasks": "vqav2,imagenet", "run.out_dir": str(out),
                               "method.name": "ewc", "method.ewc_lambda": lam, "method.ewc_samples": 16,
                               "model.base": "", "train.seed": 7, "train.steps_per_task": steps,
                               "train.batch_size": 4, "optim.warmup_steps": 2, "eval.max_examples": 1,
                               "eval.max_new_tokens": 1, "eval.zero_shot": False, "run.progress": False,
                               "run.tensorboard": False, "run.checkpoint_every": 0})
    trainer = SequenceTrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    ratios = load_benchmark("ewc_lambda_sweep").measure_gradient_ratio(trainer)
    trainer.run()
    return ratios


def test_penalty_gradient_is_of_the_task_gradients_order_at_the_default_lambda(data_root, tmp_path):
    lam = MethodConfig().ewc_lambda
    ratios = _ratios(data_root, tmp_path / "default", lam)
    assert len(ratios) == 12  # every step of task 2 measured, none of task 1 (no Fisher yet)
    median = statistics.median(ratios)
    print(f"median ||grad penalty|| / ||grad task|| = {median:.3g} at ewc_lambda={lam:g}")
    assert 0.1 <= median <= 10, f"||grad penalty|| / ||grad task|| = {median:.3g} at ewc_lambda={lam:g}"
    # The failure mode for scale: 1000x weaker, the penalty all but vanishes against the task gradient.
    weak = statistics.median(_ratios(data_root, tmp_path / "weak", lam / 1000))
    print(f"median ratio {weak:.3g} at ewc_lambda={lam / 1000:g}")
    assert weak < 0.1 * median
