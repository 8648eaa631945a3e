"""The trainer end to end on a tiny slice of Continual-NExT-mini: artefacts, resume after kill -9,
config errors, mismatched checkpoints, a full disk during a save."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mage.trainer import checkpoint as ckpt
from mage.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mage.trainer.config import ConfigError, load_config, parse_cli, save_config
from mage.trainer.main import main
from tests.mini_fixtures import write_mini

REPO = Path(__file__).resolve().parents[1]
TASKS = "vqav2,hqedit"  # image+text -> text, then image+text -> image: every batch field and LoRA group


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_mini(tmp_path_factory, TASKS.split(","), 12, 4)


def small_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--data.root", str(data_root), "--data.tasks", TASKS, "--run.out_dir", str(out),
            "--train.steps_per_task", "4", "--train.batch_size", "3", "--train.grad_accum", "2",
            "--optim.warmup_steps", "1", "--eval.max_examples", "4", "--eval.max_new_tokens", "4",
            "--run.checkpoint_every", "2", "--run.progress", "false", "--run.log_every", "2",
            # "fisher" PEMA keeps the most state across tasks (F_prev): the hardest case for resume
            "--method.pema_mode", "fisher", *extra]


@pytest.fixture(scope="module")
def full_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    result = main(small_args(data_root, out))
    return out, result


def test_end_to_end_run_writes_every_artefact(full_run):
    out, result = full_run
    assert len(result["matrix"]) == 2 and all(len(r) == 2 for r in result["matrix"])
    assert len(result["zero_shot"]) == 2
    for name in ("config.json", "accuracy_matrix.json", "accuracy_matrix.png", "metrics.md"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "accuracy_matrix.json").read_text())
    assert saved["matrix"] == result["matrix"] and saved["tasks"] == TASKS.split(",")
    md = (out / "metrics.md").read_text()
    for label in ("Avg.ACC", "Forgetting (paper form)", "Forgetting (max form)", "New.ACC", "BWT", "FWT",
                  "Avg.HAL", "Avg.IUF", "Avg.OTH"):
        assert label in md
    assert result["metrics"]["fwt"] is not None and result["metrics"]["avg_iuf"] is not None
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # Task-end checkpoints stay; mid-task ones are pruned once a newer checkpoint exists.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest.json", "task01_end.safetensors", "task01_end.state.pt", "task02_end.safetensors",
                     "task02_end.state.pt"]
    assert json.loads((out / "config.json").read_text())["train"]["steps_per_task"] == 4


def test_frozen_group_untouched_by_the_run_and_ema_in_checkpoint(full_run):
    """vqav2 trains text_in, image_in, text_out: image_out (3) must be bit-identical to its init."""
    from mage.trainer.config import Config, DataConfig, LoRAConfig
    from mage.trainer.loop import build_trainable_model

    out, _ = full_run
    torch.manual_seed(0)
    fresh = build_trainable_model(Config(data=DataConfig(), lora=LoRAConfig()), torch.device("cpu"))
    init = {f"model.{n}": p for n, p in fresh.named_parameters()}
    after1 = load_file(out / "checkpoints" / "task01_end.safetensors")
    group3 = [k for k in init if k.endswith(("lora_A_groups.3", "lora_B_groups.3"))]
    group0 = [k for k in init if k.endswith(("lora_A_groups.0", "lora_B_groups.0"))]
    assert group3 and all(torch.equal(after1[k], init[k]) for k in group3)
    assert any(not torch.equal(after1[k], init[k]) for k in group0)
    # "fisher" PEMA (small_args): F_prev after task 1 is non-zero exactly on the groups task 1 trained.
    prev = {k[len("method.fisher_prev."):]: v for k, v in after1.items() if k.startswith("method.fisher_prev.")}
    assert prev and all(not prev[k[len("model."):]].any() for k in group3)
    assert all(prev[k[len("model."):]].any() for k in group0)
    _, state = load_checkpoint(out / "checkpoints")
    assert state["task"] == 2 and state["step"] == 0 and state["engine"] is None


@pytest.mark.parametrize("crash_at, resumes_from", [
    ("2:3", "task02_step000002"),  # mid-task: optimizer, schedule, EMA, RNG and data position restored
    ("2:1", "task01_end"),         # killed before task 2's first checkpoint: restart task 2 from task 1's end
])
def test_resume_after_kill_9_is_bit_identical(full_run, data_root, tmp_path, crash_at, resumes_from):
    out, result = full_run
    resumed = tmp_path / "resumed"
    args = small_args(data_root, resumed)
    env = dict(os.environ, MAGE_CRASH_AT=crash_at)  # SIGKILL right after that (task:step)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    latest = json.loads((resumed / "checkpoints" / "latest.json").read_text())
    assert latest["tag"] == resumes_from
    again = main(args)
    assert again["matrix"] == result["matrix"] and again["zero_shot"] == result["zero_shot"]
    assert again["metrics"] == result["metrics"]
    a = load_file(out / "checkpoints" / "task02_end.safetensors")
    b = load_file(resumed / "checkpoints" / "task02_end.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A finished run started again trains nothing and reports the same.
    assert main(args)["matrix"] == result["matrix"]


def test_checkpoint_of_another_config_is_refused_with_the_differences(full_run, data_root):
    out, _ = full_run
    args = small_args(data_root, out, "--lora.rank", "4", "--method.name", "ew_ga")
    with pytest.raises(CheckpointError) as e:
        main(args)
    msg = str(e.value)
    assert "lora.rank: 8 in the checkpoint, 4 now" in msg and "method.name: 'mage'" in msg
    assert "--run.out_dir" in msg


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    save_checkpoint(d, "task01_end", {"w": torch.ones(3)}, {"task": 1})
    real = ckpt._write_durably

    def disk_full(f, data):
        real(f, data[: len(data) // 2])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_durably", disk_full)
    with pytest.raises(CheckpointError, match="disk is full.*previous checkpoint 'task01_end' is intact"):
        save_checkpoint(d, "task02_step000002", {"w": torch.zeros(3)}, {"task": 2})
    monkeypatch.setattr(ckpt, "_write_durably", real)
    tensors, state = load_checkpoint(d)
    assert torch.equal(tensors["w"], torch.ones(3)) and state == {"task": 1}
    assert sorted(p.name for p in d.iterdir()) == ["latest.json", "task01_end.safetensors", "task01_end.state.pt"]


def test_bad_names_and_keys_give_clear_errors(data_root, tmp_path):
    with pytest.raises(ConfigError, match="valid tasks: vqav2, imagenet, flickr30k, ocrvqa, refcoco, hqedit"):
        main(small_args(data_root, tmp_path / "a", "--data.tasks", "vqav2,coco"))
    with pytest.raises(ConfigError, match="valid methods: cia, ew, ew_ga, ewc, joint, lae, lora, mage, moelora, pgp"):
        main(small_args(data_root, tmp_path / "b", "--method.name", "ewc2"))
    with pytest.raises(ConfigError, match="valid keys in \\[optim\\]: lr, betas"):
        main(["--set", "optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        main(["--config", "nope"])
    with pytest.raises(ConfigError, match="deepspeed runs on CUDA only"):
        main(small_args(data_root, tmp_path / "d", "--train.engine", "deepspeed", "--train.device", "cpu"))
    with pytest.raises(ConfigError, match="task_overrides name unknown task"):
        main(small_args(data_root, tmp_path / "c", "--set", 'task_overrides={"hq": {"train.batch_size": 2}}'))


def test_command_line_errors_exit_with_the_message_not_a_traceback():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--data.order", "random"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: data.tasks/data.order: unknown task order 'random'; valid orders: "
                                   "default, reverse, alphabetical (or an explicit list of task names)")


def test_saved_config_loads_back(tmp_path):
    cfg = load_config("seed-x-13b", {"optim.lr": "3e-4", "data.tasks": "vqav2,hqedit"})
    save_config(cfg, tmp_path / "config.json")
    assert load_config(str(tmp_path / "config.json")) == cfg


def test_presets_and_overrides():
    paper = load_config("seed-x-13b")
    assert (paper.optim.lr, paper.optim.betas, paper.optim.eps, paper.optim.weight_decay) == (1e-4, (0.9, 0.98), 1e-6, 0.05)
    assert (paper.optim.warmup_steps, paper.optim.min_lr_ratio, paper.optim.grad_clip) == (125, 0.05, 1.0)
    assert (paper.train.batch_size, paper.train.grad_accum, paper.train.steps_per_task) == (16, 2, 3001)
    assert (paper.train.engine, paper.train.zero_stage, paper.train.bf16) == ("ddp", 1, "true")
    hq = paper.for_task("hqedit")
    assert (hq.train.batch_size, hq.train.steps_per_task, hq.optim.warmup_steps) == (6, 10001, 250)
    assert paper.for_task("vqav2").train.batch_size == 16
    preset, overrides = parse_cli(["--set", "optim.lr=2e-4", "--optim.betas", "0.8,0.9", "--train.seed=3"])
    cfg = load_config(preset, overrides)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.train.seed) == (2e-4, (0.8, 0.9), 3)
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config("mini", {"train.seed": "1.5"})


def test_checkpoint_tensors_load_into_the_lora_groups_and_a_missing_one_is_named():
    from torch import nn

    from mage.lora import MultiLoRALinear
    from mage.trainer.loop import load_model_tensors_, model_tensors

    class NoState:  # a method with no extra trainables and no state
        extras = ()

        def state_dict(self):
            return {}

    torch.manual_seed(0)
    model, method = nn.Sequential(MultiLoRALinear(nn.Linear(6, 5), rank=2)), NoState()
    saved = {k: torch.randn_like(t) for k, t in model_tensors(model, method).items()}
    load_model_tensors_(model, method, saved)
    for k, t in model_tensors(model, method).items():
        assert torch.equal(t, saved[k]), k
    # Only the model's tensors: the Fisher buffers are left as they are.
    fisher_before = {k: t.clone() for k, t in model_tensors(model, method).items() if k.startswith("fisher.")}
    load_model_tensors_(model, method, {k: v + 1 for k, v in saved.items()}, prefixes=("model.",))
    assert all(torch.equal(model_tensors(model, method)[k], v) for k, v in fisher_before.items())
    assert torch.equal(model_tensors(model, method)["model.0.lora_A_groups.0"], saved["model.0.lora_A_groups.0"] + 1)
    missing = dict(saved)
    del missing["model.0.lora_B_groups.3"]
    with pytest.raises(CheckpointError, match="lacks model.0.lora_B_groups.3"):
        load_model_tensors_(model, method, missing)
