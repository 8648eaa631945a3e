"""The DeepSpeed engine against a stand-in for DeepSpeed (not installed in CI; it needs CUDA): the stand-in has
DeepSpeed 0.19's public signatures (``deepspeed.initialize``, ``engine.backward/step/save_checkpoint/
load_checkpoint``, ``deepspeed.utils.safe_get_full_grad``, the ZeRO optimizer's ``overflow`` /
``has_overflow``) and the behaviour our engine relies on, including the pre-0.19 ``module.bfloat16()`` cast
of bf16 mode. What it cannot show (ZeRO partitioning, NCCL) is for a GPU run: docs/TRAINING.md "DeepSpeed"."""
from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mage.trainer.loop as loop
from mage.trainer.engine import DeepSpeedEngine, trainables_to_fp32_
from mage.trainer.main import main
from tests.mini_fixtures import write_mini

TASK = "vqav2"


class FakeZeroOptimizer:
    """The parts of DeepSpeedZeroOptimizer (stage 1/2) the engine touches, around the client's optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, stage: int, clip: float):
        self.optimizer, self.clip = optimizer, clip
        self.partition_gradients = stage == 2
        self.overflow = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _params(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def has_overflow(self, partition_gradients=True):
        return any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self._params())

    def zero_grad(self, set_to_none=True):
        for p in self._params():
            p.grad = None

    def step(self, closure=None):
        if self.overflow:  # DeepSpeed: clear the gradients and return without touching the optimizer
            self.zero_grad()
            return
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params(), self.clip)
        self.optimizer.step()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict_list, load_optimizer_states=True, load_from_fp32_weights=False,
                        checkpoint_folder=None, load_serial=None, param_shapes=None):
        self.optimizer.load_state_dict(state_dict_list[0])


class FakeDeepSpeedEngine(torch.nn.Module):
    instances: list["FakeDeepSpeedEngine"] = []
    force_module_cast = False  # simulate a DeepSpeed that casts the whole module whatever the config says

    def __init__(self, model, optimizer, lr_scheduler, config):
        super().__init__()
        self.module, self.config, self.lr_scheduler = model, config, lr_scheduler
        if config["bf16"]["enabled"] or self.force_module_cast:
            model.bfloat16()  # DeepSpeed < 0.19 in bf16 mode: parameters AND buffers
        self.optimizer = FakeZeroOptimizer(optimizer, config["zero_optimization"]["stage"],
                                           config["gradient_clipping"])
        self.gas = config["gradient_accumulation_steps"]
        self.micro_steps = self.global_steps = self.skipped_steps = 0
        self.calls: list[tuple] = []
        FakeDeepSpeedEngine.instances.append(self)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        (loss / self.gas if scale_wrt_gas else loss).backward(retain_graph=retain_graph)
        return loss

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.gas == 0

    def step(self, lr_kwargs=None):
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad()
            if self.optimizer.overflow:
                self.skipped_steps += 1
            else:
                self.lr_scheduler.step(**(lr_kwargs or {}))
            self.global_steps += 1
        self.micro_steps += 1

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False):
        self.calls.append(("save", save_dir, tag, dict(client_state), save_latest, exclude_frozen_parameters))
        tag = tag if tag is not None else f"global_step{self.global_steps}"
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        module = {n: p.detach().clone() for n, p in self.module.named_parameters()
                  if p.requires_grad or not exclude_frozen_parameters}
        torch.save({"module": module, "lr_scheduler": self.lr_scheduler.state_dict(), "global_steps": self.global_steps,
                    "skipped_steps": self.skipped_steps, **client_state}, folder / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": self.optimizer.state_dict()},
                   folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        if save_latest:
            (Path(save_dir) / "latest").write_text(tag)
        return True

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        self.calls.append(("load", load_dir, tag, load_module_strict, load_optimizer_states, load_lr_scheduler_states,
                           load_module_only))
        if tag is None:
            tag = (Path(load_dir) / "latest").read_text().strip()
        folder = Path(load_dir) / tag
        if not folder.is_dir():
            return None, None  # DeepSpeed logs a warning and returns (None, None)
        state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
        missing, unexpected = self.module.load_state_dict(state.pop("module"), strict=load_module_strict)
        if load_optimizer_states and not load_module_only:
            optim = torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
            self.optimizer.load_state_dict([optim["optimizer_state_dict"]])
        if load_lr_scheduler_states and not load_module_only:
            self.lr_scheduler.load_state_dict(state.pop("lr_scheduler"))
        self.global_steps, self.skipped_steps = state.pop("global_steps"), state.pop("skipped_steps")
        return str(folder), state


def fake_initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
                    lr_scheduler=None, distributed_port=29500, mpu=None, dist_init_required=None, collate_fn=None,
                    config=None, mesh_param=None, config_params=None):
    engine = FakeDeepSpeedEngine(model, optimizer, lr_scheduler, config)
    return engine, engine.optimizer, None, engine.lr_scheduler


def test_stand_in_has_deepspeed_signatures():
    """The signatures copied from DeepSpeed 0.19 (deepspeed/__init__.py, runtime/engine.py)."""
    assert list(inspect.signature(fake_initialize).parameters) == [
        "args", "model", "optimizer", "model_parameters", "training_data", "lr_scheduler", "distributed_port", "mpu",
        "dist_init_required", "collate_fn", "config", "mesh_param", "config_params"]
    assert str(inspect.signature(FakeDeepSpeedEngine.save_checkpoint)) == (
        "(self, save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False)")
    assert str(inspect.signature(FakeDeepSpeedEngine.load_checkpoint)) == (
        "(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True, "
        "load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None)")
    assert str(inspect.signature(FakeDeepSpeedEngine.backward)) == "(self, loss, retain_graph=False, scale_wrt_gas=True)"


@pytest.fixture
def fake_deepspeed(monkeypatch):
    module = types.ModuleType("deepspeed")
    module.initialize = fake_initialize
    module.utils = types.SimpleNamespace(safe_get_full_grad=lambda p: p.grad)
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    monkeypatch.setattr(loop, "check_engine", lambda train_cfg, device: None)  # it refuses CPU
    FakeDeepSpeedEngine.instances = []
    FakeDeepSpeedEngine.force_module_cast = False
    return module


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_mini(tmp_path_factory, [TASK], 12, 2)


def args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["--data.root", str(data_root), "--data.tasks", TASK, "--run.out_dir", str(out),
            "--train.engine", "deepspeed", "--train.steps_per_task", "4", "--train.batch_size", "2",
            "--train.grad_accum", "2", "--optim.warmup_steps", "1", "--run.checkpoint_every", "2",
            "--eval.max_examples", "2", "--eval.max_new_tokens", "2", "--eval.zero_shot", "false",
            "--run.progress", "false", "--run.tensorboard", "false", "--method.pema_mode", "fisher", *extra]


def bf16_model_like_13b():
    """The tiny graph with the 13B's dtypes: bf16 weights, LoRA on, trainables in fp32 as the trainer holds them."""
    from mage.methods import build_method
    from mage.methods.base import lora_group_params
    from mage.trainer.config import Config
    from mage.trainer.loop import build_trainable_model

    torch.manual_seed(0)
    cfg = Config()
    model = build_trainable_model(cfg, torch.device("cpu"))
    for p in model.parameters():  # parameters only: the Fisher buffers stay fp32 as in a bf16 model's LoRA layers
        p.data = p.data.bfloat16()
    method = build_method("mage", cfg.method, model)
    trainables_to_fp32_(p for _, p in [*lora_group_params(model), *method.extras])
    method.on_task_start((0, 1, 2))
    return cfg, model, method


def test_fisher_buffers_and_trainables_keep_their_dtypes(fake_deepspeed):
    from mage.lora import iter_multi_lora
    from mage.trainer.distributed import DistInfo

    cfg, model, method = bf16_model_like_13b()
    engine = DeepSpeedEngine(model, method.param_groups(0.05), cfg.optim, cfg.train, 4,
                             DistInfo(0, 1, 0, torch.device("cpu")))
    ds = FakeDeepSpeedEngine.instances[-1]
    assert ds.config["bf16"] == {"enabled": False} and ds.config["fp16"] == {"enabled": False}
    for _, m in iter_multi_lora(model):
        assert m.fisher_A.dtype == m.fisher_B.dtype == torch.float32 and m.fisher_count.dtype == torch.float64
        assert m.base.weight.dtype == torch.bfloat16
    assert {p.dtype for p in engine.params} == {torch.float32}
    assert all(t.dtype == torch.float32 for t in method.ema.values())


def test_a_module_cast_by_deepspeed_is_undone_for_buffers_and_refused_for_trainables(fake_deepspeed):
    from mage.lora import iter_multi_lora
    from mage.trainer.distributed import DistInfo

    cfg, model, method = bf16_model_like_13b()
    _, first = next(iter_multi_lora(model))
    first.fisher_A.normal_()  # values a bf16 round trip would change
    first.fisher_count.fill_(1001)
    before_a = first.fisher_A.clone()
    FakeDeepSpeedEngine.force_module_cast = True
    with pytest.raises(RuntimeError, match="changed the dtype of .* trainable parameters"):
        DeepSpeedEngine(model, method.param_groups(0.05), cfg.optim, cfg.train, 4, DistInfo(0, 1, 0, torch.device("cpu")))
    assert first.fisher_A.dtype == torch.float32 and torch.equal(first.fisher_A, before_a)
    assert first.fisher_count.dtype == torch.float64 and first.fisher_count.item() == 1001


def test_resume_through_save_and_load_checkpoint_is_exact(fake_deepspeed, data_root, tmp_path, monkeypatch):
    main(args(data_root, tmp_path / "straight"))
    straight = load_file(tmp_path / "straight" / "checkpoints" / "task01_end.safetensors")

    class Crash(Exception):
        pass

    def crash_after_step_3(self, k, step):
        if step == 3:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(loop.SequenceTrainer, "_maybe_crash", crash_after_step_3)
        with pytest.raises(Crash):
            main(args(data_root, tmp_path / "resumed"))
    saves = [c for c in FakeDeepSpeedEngine.instances[-1].calls if c[0] == "save"]
    ds_dir = str(tmp_path / "resumed" / "checkpoints" / "deepspeed")
    assert saves == [("save", ds_dir, "task01_step000002", {"tag": "task01_step000002"}, False, True)]
    assert (tmp_path / "resumed" / "checkpoints" / "deepspeed" / "task01_step000002").is_dir()

    main(args(data_root, tmp_path / "resumed"))
    resumed_engine = FakeDeepSpeedEngine.instances[-1]
    assert resumed_engine.calls[0] == ("load", ds_dir, "task01_step000002", False, True, True, False)
    assert resumed_engine.global_steps == 4  # 2 restored + 2 trained
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "task01_end.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    # A task end needs no optimizer state: DeepSpeed's mid-task state is pruned with the mid-task checkpoint.
    assert not any((tmp_path / "resumed" / "checkpoints" / "deepspeed").iterdir())


def test_nonfinite_step_takes_deepspeeds_skip_path(fake_deepspeed, data_root, tmp_path, monkeypatch):
    import dataclasses

    real_forward = FakeDeepSpeedEngine.forward
    calls = [0]

    def forward(self, *inputs, **kwargs):
        out = real_forward(self, *inputs, **kwargs)
        calls[0] += 1
        return dataclasses.replace(out, loss=out.loss * float("nan")) if calls[0] == 3 else out  # step 2

    monkeypatch.setattr(FakeDeepSpeedEngine, "forward", forward)
    main(args(data_root, tmp_path / "run", "--run.checkpoint_every", "0"))
    ds = FakeDeepSpeedEngine.instances[-1]
    assert ds.skipped_steps == 1 and ds.global_steps == 4 and ds.optimizer.overflow is False
    assert ds.lr_scheduler.last_epoch == 4  # the trainer advanced the schedule over the skipped step
    steps = {float(s["step"]) for s in ds.optimizer.optimizer.state.values()}
    assert steps == {3.0}
