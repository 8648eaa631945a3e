"""Every method of the paper through the trainer on a tiny slice of Continual-NExT-mini."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mage.lora import iter_multi_lora
from mage.trainer.config import ConfigError, load_config
from mage.trainer.distributed import DistInfo
from mage.trainer.loop import SequenceTrainer
from mage.trainer.main import main
from tests.mini_fixtures import write_mini

REPO = Path(__file__).resolve().parents[1]
TASKS = "vqav2,hqedit"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_mini(tmp_path_factory, TASKS.split(","), 4, 2)


def args(data_root, out, method, *extra):
    return ["--data.root", str(data_root), "--data.tasks", TASKS, "--run.out_dir", str(out), "--method.name", method,
            "--train.steps_per_task", "2", "--train.batch_size", "2", "--train.grad_accum", "1",
            "--optim.warmup_steps", "0", "--eval.max_examples", "2", "--eval.max_new_tokens", "2",
            "--run.progress", "false", "--run.tensorboard", "false", "--model.base", "", *extra]


def test_unknown_method_is_a_one_line_config_error(data_root, tmp_path):
    with pytest.raises(ConfigError, match="valid methods: cia, ew, ew_ga, ewc, joint, lae, lora, mage, moelora"):
        main(args(data_root, tmp_path / "x", "foo"))
    proc = subprocess.run([sys.executable, "train.py", *args(data_root, tmp_path / "y", "foo")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "valid methods:" in proc.stderr


@pytest.mark.parametrize("method", ["moelora", "lae", "ew"])
def test_sequential_method_runs_two_tasks(data_root, tmp_path, method):
    result = main(args(data_root, tmp_path / method, method))
    assert len(result["matrix"]) == 2 and result["row_labels"] is None
    end2 = load_file(tmp_path / method / "checkpoints" / "task02_end.safetensors")
    state = {k for k in end2 if k.startswith("method.")}
    if method == "moelora":
        assert state and all(k.startswith("method.router.") for k in state)
    elif method == "lae":  # the offline copy exists from task 2 on and lags the online weights
        end1 = load_file(tmp_path / method / "checkpoints" / "task01_end.safetensors")
        assert not any(k.startswith("method.offline.") for k in end1)
        offline = {k[len("method.offline."):]: v for k, v in end2.items() if k.startswith("method.offline.")}
        assert offline and any(not torch.equal(v, end2[f"model.{n}"].float()) for n, v in offline.items())
    else:
        assert not state


def test_reglora_resume_rebuilds_merged_base_weights_exactly(data_root, tmp_path):
    cfg = load_config("mini", {k[2:]: v for k, v in zip(args(data_root, tmp_path / "r", "reglora")[::2],
                                                         args(data_root, tmp_path / "r", "reglora")[1::2])})
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    first = SequenceTrainer(cfg, info)
    first.run()
    again = SequenceTrainer(cfg, info)  # a new process: freshly built base weights + the checkpoint
    again._restore()
    pairs = list(zip(iter_multi_lora(first.model), iter_multi_lora(again.model)))
    assert any(not torch.equal(m.base.weight, f.base.weight)
               for (_, m), (_, f) in zip(iter_multi_lora(first.model), iter_multi_lora(
                   SequenceTrainer(cfg, info).model)))  # the run did change the base weights
    for (name, m), (_, r) in pairs:
        assert torch.equal(m.base.weight, r.base.weight), name
        assert torch.equal(first.method.positions[name], again.method.positions[name])


def test_joint_trains_one_phase_on_all_tasks_and_evaluates_once(data_root, tmp_path):
    result = main(args(data_root, tmp_path / "j", "joint"))
    assert len(result["matrix"]) == 1 and len(result["matrix"][0]) == 2
    assert result["row_labels"] == ["joint (all tasks)"]
    m = result["metrics"]
    assert m["avg_acc"] == pytest.approx(sum(result["matrix"][0]) / 2) and m["forgetting"] is None
    ckpts = sorted(p.name for p in (tmp_path / "j" / "checkpoints").glob("*.safetensors"))
    assert ckpts == ["task01_end.safetensors"]
    saved = json.loads((tmp_path / "j" / "config.json").read_text())
    assert saved["method"]["name"] == "joint"
    assert "joint (all tasks)" in (tmp_path / "j" / "metrics.md").read_text()


def test_joint_stream_mixes_every_task(data_root):
    from mage.data.tasks import get_task
    from mage.model import build_model
    from mage.trainer.data import TrainStream

    model = build_model("tiny", device="cpu")
    stream = TrainStream([get_task("vqav2"), get_task("hqedit")], data_root, model, batch_size=8, seed=0, rank=0,
                         world_size=1)
    assert set(stream.next_batch()["task_ids"].tolist()) == {0, 5}


def test_zero_shot_trains_nothing_and_reports_the_zero_shot_row(data_root, tmp_path):
    result = main(args(data_root, tmp_path / "z", "zero_shot", "--eval.zero_shot", "false"))
    assert result["matrix"] == [result["zero_shot"]] and result["row_labels"] == ["no training"]
    assert result["metrics"]["avg_acc"] == pytest.approx(sum(result["zero_shot"]) / 2)
    assert not (tmp_path / "z" / "checkpoints").exists()


def test_error_type_forgetting_covers_image_tasks(data_root, tmp_path):
    """hqedit (image output) is the first task here: its labels count in Avg.HAL/IUF/OTH."""
    out = tmp_path / "e"
    main(["--data.root", str(data_root), "--data.tasks", "hqedit,vqav2", "--run.out_dir", str(out),
          "--method.name", "lora", "--train.steps_per_task", "1", "--train.batch_size", "2", "--train.grad_accum",
          "1", "--eval.max_examples", "2", "--eval.max_new_tokens", "1", "--run.progress", "false",
          "--run.tensorboard", "false", "--model.base", "", "--eval.image_label_threshold", "1000"])
    state = torch.load(out / "checkpoints" / "task02_end.state.pt", weights_only=True)
    assert state["labels"]["0,0"] == ["HAL", "HAL"] and state["labels"]["1,0"] == ["HAL", "HAL"]
    md = (out / "metrics.md").read_text()
    assert "| Avg.HAL | 0.00 |" in md  # HAL both right after hqedit and after vqav2: no new HAL errors


@pytest.mark.parametrize("method, crash_at", [("reglora", "2:1"), ("lae", "2:1"), ("joint", "1:2")])
def test_kill_9_mid_task_and_resume_is_bit_identical(data_root, tmp_path, method, crash_at):
    import os

    full = main(args(data_root, tmp_path / "full", method, "--run.checkpoint_every", "1"))
    resumed = tmp_path / "resumed"
    run_args = args(data_root, resumed, method, "--run.checkpoint_every", "1")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *run_args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, MAGE_CRASH_AT=crash_at))
    assert proc.returncode == -9, proc.stderr[-2000:]
    task, step = crash_at.split(":")
    latest = json.loads((resumed / "checkpoints" / "latest.json").read_text())
    assert latest["tag"] == f"task{int(task):02d}_step{int(step):06d}"
    again = main(run_args)
    assert again["matrix"] == full["matrix"] and again["metrics"] == full["metrics"]
    end = sorted(p.name for p in (tmp_path / "full" / "checkpoints").glob("*_end.safetensors"))[-1]
    a, b = load_file(tmp_path / "full" / "checkpoints" / end), load_file(resumed / "checkpoints" / end)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
