"""How one optimizer step is executed: plain/DDP (default) or DeepSpeed ZeRO (GPU, optional).

Both expose the same calls so the loop reads the same for either:
``accumulating(last)`` context per micro-batch, ``backward(loss_mean, last)``, ``step_is_finite(loss_sum)`` (the
skip decision), ``grad_of(p)`` (the averaged, unclipped gradient), ``clip()``, ``step()`` or ``skip_step()``.

Precision (docs/TRAINING.md "Precision"): frozen weights keep the model's dtype (bf16 for SEED-X 13B), every
parameter a method can train is float32 (``trainables_to_fp32_``) and the forward runs under the trainer's bf16
autocast. The trainable parameters are therefore their own fp32 master weights under either engine: the
optimizer updates them in fp32 and PEMA reads exactly the values the optimizer holds.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mage.trainer.checkpoint import CheckpointError
from mage.trainer.config import ConfigError
from mage.trainer.distributed import DistInfo, all_reduce_sum
from mage.trainer.optim import build_optimizer, build_scheduler

# DeepSpeed's own checkpoints (optimizer partitions, schedule, counters) live in CKPT_DIR/deepspeed/TAG/.
DEEPSPEED_CKPT_SUBDIR = "deepspeed"


def trainables_to_fp32_(params: Iterable[nn.Parameter]) -> None:
    """Hold ``params`` (everything a method may train) in float32, in place (the Parameter objects stay).

    With bf16 weights AdamW would round most lr 1e-4 updates of the norm weights away, and PEMA would average
    bf16-rounded weights; in fp32 the parameter is its own master copy. Frozen weights are not touched.
    """
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def _total_grad_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads, foreach=True)


class DDPEngine:
    """Single process or DistributedDataParallel; rebuilt per task because the trainable set changes."""

    sharded_state = False  # optimizer state identical on every rank: rank 0 saves it

    def __init__(self, model: nn.Module, param_groups: list[dict], optim_cfg, train_cfg, total_steps: int,
                 info: DistInfo):
        self.module = model
        self.accumulation = train_cfg.grad_accum
        self.max_norm = optim_cfg.grad_clip
        self.params = [p for g in param_groups for p in g["params"]]
        self.device = info.device
        self._grad_norm: torch.Tensor | None = None  # set by step_is_finite, used by clip
        if info.distributed:
            # The Fisher buffers are per-rank partial sums (the method all-reduces them after each step):
            # DDP must not overwrite them with rank 0's before each forward. (At construction they are 0.)
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                              else {"broadcast_buffers": False})
            self.wrapped = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                               find_unused_parameters=train_cfg.find_unused_parameters, **no_buffer_sync)
        else:
            self.wrapped = model
        self.optimizer = build_optimizer(param_groups, optim_cfg, info.device)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)

    def forward(self, batch: dict):
        return self.wrapped(batch)

    def accumulating(self, last: bool):
        """Skip DDP's gradient all-reduce on all micro-batches but the last of a step."""
        if isinstance(self.wrapped, DDP) and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss_mean: torch.Tensor, last: bool) -> None:
        (loss_mean / self.accumulation).backward()

    def grad_of(self, p: nn.Parameter) -> torch.Tensor | None:
        return p.grad

    def step_is_finite(self, loss_sum: torch.Tensor) -> bool:
        """True when this step's loss on every rank and its averaged gradient are all finite.

        The one host sync this adds per step is the ``.item()`` below: whether the optimizer, the method's hooks
        and the Fisher all-reduce run is Python control flow, and every rank must take the same branch. It comes
        after the step's last backward, where the host has nothing left to queue but the optimizer step, so it
        costs the launch latency of that step, not a stall of queued work. The flags are fused into one tensor
        and one all-reduce (the loss is per rank; the DDP gradient is already the average over ranks); the
        gradient norm computed here is the one ``clip`` uses, so the gradients are read once.
        """
        self._grad_norm = _total_grad_norm(self.params, loss_sum.device)
        bad = (~torch.isfinite(loss_sum)).float() + (~torch.isfinite(self._grad_norm)).float()
        all_reduce_sum(bad)
        return not bool(bad.item())

    def clip(self) -> torch.Tensor | None:
        """Clip to ``optim.grad_clip`` with the norm ``step_is_finite`` computed; returns that (unclipped) norm."""
        norm = self._grad_norm if self._grad_norm is not None else _total_grad_norm(self.params, self.device)
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_norm, norm, foreach=True)
        self._grad_norm = None
        return norm

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        """Drop this step's gradients; the optimizer (weights, moments, step count) is untouched.

        The schedule still advances: it is indexed by the task's step, like the data stream and the checkpoint
        names, so a skipped step costs one update and the lr still reaches its floor at the task's last step.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self._grad_norm = None
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" when the first step skips
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_sharded(self, ckpt_dir: Path, tag: str) -> None:
        raise NotImplementedError("DDP keeps one optimizer state for all ranks: use state_dict()")

    def load_sharded(self, ckpt_dir: Path, tag: str) -> None:
        raise NotImplementedError("DDP keeps one optimizer state for all ranks: use load_state_dict()")


def check_engine(train_cfg, device) -> None:
    """Fail before any work when the chosen engine cannot run here."""
    if train_cfg.engine != "deepspeed":
        return
    if device.type != "cuda":
        raise ConfigError("train.engine=deepspeed runs on CUDA only; use train.engine=ddp on CPU")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("train.engine=deepspeed needs DeepSpeed: `pip install deepspeed` on a CUDA machine, "
                          "or use train.engine=ddp")


class DeepSpeedEngine(DDPEngine):
    """ZeRO stage 1/2 through ``deepspeed.initialize`` with our AdamW and schedule (GPU only).

    DeepSpeed runs in its fp32 mode, with bf16 coming from the trainer's autocast as under DDP. Its bf16 mode
    would cast the module: every parameter (our fp32 trainables, which are also the weights PEMA reads) and,
    before DeepSpeed 0.19, every buffer too (the fp32 Fisher sums, the float64 example counts, RoPE's
    ``inv_freq``), after which the Fisher kernels refuse their accumulators. Its only gain here would be a bf16
    copy of the ~0.64 B trainables, since the 14.6 B frozen weights are bf16 already. Buffers are nevertheless
    restored after ``initialize`` if a DeepSpeed version casts them, and a cast of a trainable is an error.

    DeepSpeed scales the loss by 1/accumulation itself, clips inside ``step`` and keeps gradients in
    partitions, so the unclipped full gradient of a parameter comes from ``safe_get_full_grad``. Its optimizer
    state is saved per rank with ``save_checkpoint`` / ``load_checkpoint``.
    """

    sharded_state = True  # ZeRO partitions the optimizer state: every rank saves its own

    def __init__(self, model: nn.Module, param_groups: list[dict], optim_cfg, train_cfg, total_steps: int,
                 info: DistInfo):
        try:
            import deepspeed
        except ImportError:
            raise RuntimeError("train.engine=deepspeed needs DeepSpeed: `pip install deepspeed` on a CUDA machine, "
                               "or use train.engine=ddp") from None
        self._ds = deepspeed
        self.module = model
        self.accumulation = train_cfg.grad_accum
        self.max_norm = optim_cfg.grad_clip
        self.params = [p for g in param_groups for p in g["params"]]
        optimizer = build_optimizer(param_groups, optim_cfg, info.device)
        scheduler = build_scheduler(optimizer, optim_cfg, total_steps)
        ds_config = {
            "train_micro_batch_size_per_gpu": train_cfg.batch_size,
            "gradient_accumulation_steps": train_cfg.grad_accum,
            "gradient_clipping": max(0.0, optim_cfg.grad_clip),
            # fp32 mode: no module cast (see the class docstring); bf16 compute comes from our autocast.
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
            "zero_optimization": {"stage": train_cfg.zero_stage},
            "steps_per_print": 10**9,
        }
        buffers = {name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()}
        trainable_dtypes = {id(p): p.dtype for p in self.params}
        self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        _restore_buffers(model, buffers)
        cast = [tuple(p.shape) for p in self.params if p.dtype != trainable_dtypes[id(p)]]
        if cast:
            raise RuntimeError(f"deepspeed.initialize changed the dtype of {len(cast)} trainable parameters (shapes "
                               f"{cast[:3]}...): this DeepSpeed version casts the module outside its bf16/fp16 "
                               "modes; use train.engine=ddp or another DeepSpeed version")

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed skips the reduction off the accumulation boundary itself

    def backward(self, loss_mean: torch.Tensor, last: bool) -> None:
        self.wrapped.backward(loss_mean)
        if not last:
            self.wrapped.step()  # only advances DeepSpeed's micro-step counter off the boundary

    def grad_of(self, p: nn.Parameter) -> torch.Tensor | None:
        return self._ds.utils.safe_get_full_grad(p)

    def step_is_finite(self, loss_sum: torch.Tensor) -> bool:
        """As ``DDPEngine.step_is_finite``; the gradient check is ZeRO's own overflow check over its partitions
        (an all-reduce and a host sync inside DeepSpeed), so this engine syncs twice per step."""
        bad_loss = (~torch.isfinite(loss_sum)).float()
        all_reduce_sum(bad_loss)
        bad_grad = self.optimizer.has_overflow(partition_gradients=self.optimizer.partition_gradients)
        return not (bool(bad_loss.item()) or bool(bad_grad))

    def clip(self) -> torch.Tensor | None:
        return None  # inside step (gradient_clipping)

    def step(self) -> None:
        self.wrapped.step()

    def skip_step(self) -> None:
        """DeepSpeed's own skip path (that of an fp16 overflow): with the ZeRO optimizer's ``overflow`` flag set,
        ``engine.step()`` clears the gradients, counts ``skipped_steps`` and leaves the optimizer and the
        schedule alone; the schedule then advances as under DDP (see ``DDPEngine.skip_step``)."""
        self.optimizer.overflow = True
        try:
            self.wrapped.step()
        finally:
            self.optimizer.overflow = False  # in fp32 mode DeepSpeed never recomputes the flag itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        raise NotImplementedError("DeepSpeed's optimizer state is per rank: use save_sharded()")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("DeepSpeed's optimizer state is per rank: use load_sharded()")

    def save_sharded(self, ckpt_dir: Path, tag: str) -> None:
        """All ranks: DeepSpeed writes its optimizer partitions, schedule and counters to CKPT_DIR/deepspeed/TAG.

        Frozen parameters (the 13 B base model) are left out; the trainables it also writes are the same values
        as in our safetensors file, which stays the source of the weights.
        """
        self.wrapped.save_checkpoint(str(Path(ckpt_dir) / DEEPSPEED_CKPT_SUBDIR), tag=tag, client_state={"tag": tag},
                                     save_latest=False, exclude_frozen_parameters=True)

    def load_sharded(self, ckpt_dir: Path, tag: str) -> None:
        load_dir = Path(ckpt_dir) / DEEPSPEED_CKPT_SUBDIR
        # Not strict: the checkpoint has no frozen parameters (exclude_frozen_parameters above).
        path, client_state = self.wrapped.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False,
                                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None or (client_state or {}).get("tag") != tag:
            raise CheckpointError(f"DeepSpeed could not load its state {tag!r} from {load_dir} (the optimizer "
                                  "partitions of this checkpoint); resume with the same number of processes and "
                                  "ZeRO stage, or start a new run with --run.out_dir OTHER_DIR")


def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back any buffer whose dtype changed (values from ``saved``, taken before the cast)."""
    modules = dict(model.named_modules())
    for name, buf in list(model.named_buffers()):
        before = saved.get(name)
        if before is not None and buf.dtype != before.dtype:
            owner, _, attr = name.rpartition(".")
            modules[owner]._buffers[attr] = before.to(buf.device)


def prune_engine_shards(ckpt_dir: Path, keep_tag: str | None) -> None:
    """Remove DeepSpeed's per-rank state of every checkpoint but ``keep_tag`` (None: of all).

    Only mid-task checkpoints carry it: a task starts with a fresh optimizer, so task ends need none.
    """
    root = Path(ckpt_dir) / DEEPSPEED_CKPT_SUBDIR
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.is_dir() and path.name != keep_tag:
            shutil.rmtree(path, ignore_errors=True)


def build_engine(model: nn.Module, param_groups: list[dict], optim_cfg, train_cfg, total_steps: int,
                 info: DistInfo) -> DDPEngine:
    if train_cfg.engine == "deepspeed":
        return DeepSpeedEngine(model, param_groups, optim_cfg, train_cfg, total_steps, info)
    return DDPEngine(model, param_groups, optim_cfg, train_cfg, total_steps, info)
