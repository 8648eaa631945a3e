"""The continual sequence, top to bottom: zero-shot row, then per task train -> consolidate -> evaluate -> save.

Resumption: the newest checkpoint names the task and step to continue from and carries everything that
decides what happens next (weights, EMA, Fisher, optimizer, schedule, RNG, data position, scores so far),
so a resumed run computes exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import gc
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mage.eval.metrics import error_type_forgetting, single_phase_metrics
from mage.lora import iter_multi_lora, wrap_llama_lora
from mage.methods import METHODS, ContinualMethod, build_method
from mage.methods.base import lora_group_params
from mage.model import build_model
from mage.model.checkpoint import load_seed_x
from mage.model.pretrain import load_base_, resolve_base
from mage.trainer.checkpoint import CheckpointError, load_checkpoint, prune_mid_task, read_latest, save_checkpoint
from mage.trainer.config import Config, ConfigError, config_differences, save_config
from mage.trainer.data import (TrainStream, check_pretrained_tasks, check_task_overrides, prepare_data, resolve_tasks,
                               to_device)
from mage.trainer.distributed import DistInfo, barrier
from mage.trainer.engine import DDPEngine, build_engine, check_engine, prune_engine_shards, trainables_to_fp32_
from mage.trainer.evaluate import check_eval_config, evaluate_tasks, scorer_names
from mage.trainer.logging import RunLogger
from mage.trainer.report import compute_metrics, format_matrix, format_metrics, write_reports

# Test hook: "TASK:STEP" (1-based task, optimizer steps done) -> SIGKILL this process right after that
# step's mid-task checkpoint logic, as an abrupt crash would.
CRASH_ENV = "MAGE_CRASH_AT"
# The label of the one evaluation row of methods that do not train task by task (method.schedule).
SINGLE_ROW_LABELS = {"joint": "joint (all tasks)", "none": "no training"}


class NonFiniteStepsError(RuntimeError):
    """More steps of a task had a non-finite loss or gradient than ``train.max_nonfinite_steps`` allows."""


@dataclass
class Progress:
    """Where the sequence stands; saved in every checkpoint."""
    task: int = 0                      # index of the task to train next (or being trained)
    step: int = 0                      # optimizer steps of that task already done
    zero_shot: list[float] | None = None
    rows: list[list[float]] = field(default_factory=list)
    labels: dict[str, list[str]] = field(default_factory=dict)   # "j,i" -> per-example error labels
    nonfinite: int = 0                 # steps of the current task skipped for a non-finite loss or gradient

    def error_labels(self) -> dict[tuple[int, int], list[str]]:
        return {tuple(int(x) for x in k.split(",")): v for k, v in self.labels.items()}


def build_trainable_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """SEED-X with the SFT trainable set and the four LoRA groups on every LLaMA target linear."""
    paths = cfg.model.weight_paths()
    if any(paths.values()):
        missing = [k for k, v in paths.items() if not v]
        if missing:
            raise ValueError(f"loading SEED-X weights needs all of model.{', model.'.join(paths)}; "
                             f"missing: model.{', model.'.join(missing)}")
        model = load_seed_x(paths["agent_path"], paths["llm_path"], paths["vision_path"], name=cfg.model.name,
                            tokenizer=paths["tokenizer_path"], device=device,
                            gradient_checkpointing=cfg.model.gradient_checkpointing)
    elif cfg.model.name != "tiny":
        raise ValueError(f"model {cfg.model.name!r} is trained from local weights: set model.agent_path, "
                         "model.llm_path, model.vision_path and model.tokenizer_path")
    else:
        model = build_model(cfg.model.name, device=device, gradient_checkpointing=cfg.model.gradient_checkpointing)
        if cfg.model.base:
            load_base_(model, _base_path(cfg.model, model.tokenizer))
    model.freeze_for_sft()
    lora = cfg.lora
    wrap_llama_lora(model.llm, rank=lora.rank, num_groups=lora.num_groups, alpha=lora.alpha, dropout=lora.dropout,
                    backend=lora.backend)
    if cfg.model.init_from:
        from mage.model.convert import load_init
        report = load_init(model, cfg.model.init_from)
        print(f"initialised from {cfg.model.init_from}: {report.summary()}", flush=True)
    return model


def _base_path(cfg, tokenizer) -> Path:
    if cfg.name != "tiny":
        raise ValueError(f"model.base={cfg.base!r} is for the tiny model; {cfg.name!r} loads its weights from "
                         "model.agent_path, llm_path, vision_path and tokenizer_path")
    if cfg.base == "auto":
        # The committed base (assets/) is found by every rank. A missing or stale one is built once into
        # the cache; ranks that build at the same time write the same bytes through an atomic rename.
        return resolve_base(cfg.base_seed, tokenizer)
    path = Path(cfg.base)
    if not path.is_file():
        raise ValueError(f"model.base={cfg.base!r}: no such file; use 'auto' for the pretrained tiny base, '' for a "
                         "random init, or the path of a file written by python -m mage.model.pretrain")
    return path


# ------------------------------------------------------------------------------------------ state

def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor, so the sidecar loads with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_tensors(model: torch.nn.Module, method: ContinualMethod) -> dict[str, torch.Tensor]:
    """Everything trainable at any point (all LoRA groups, non-LoRA trainables), Fisher buffers, method state."""
    out = {}
    for name, m in iter_multi_lora(model):
        for g in range(m.num_groups):
            out[f"model.{name}.lora_A_groups.{g}"] = m.lora_A_groups[g]
            out[f"model.{name}.lora_B_groups.{g}"] = m.lora_B_groups[g]
        for buf in ("fisher_A", "fisher_B", "fisher_count"):
            out[f"fisher.{name}.{buf}"] = getattr(m, buf)
    out.update({f"model.{n}": p for n, p in method.extras})
    out.update({f"method.{k}": v for k, v in method.state_dict().items()})
    return out


@torch.no_grad()
def load_model_tensors_(model: torch.nn.Module, method: ContinualMethod, tensors: dict[str, torch.Tensor],
                        prefixes: tuple[str, ...] = ("model.", "fisher.")) -> None:
    """Copy a checkpoint's tensors whose names start with ``prefixes`` into the model (see `model_tensors`)."""
    for k, t in model_tensors(model, method).items():
        if k.startswith(prefixes):
            if k not in tensors:
                raise CheckpointError(f"checkpoint lacks {k}: written by a different model/LoRA layout")
            t.copy_(tensors[k])


# ------------------------------------------------------------------------------------------ the run

class SequenceTrainer:
    """One continual run: owns the model, method, data and run folder; ``run()`` goes start to end."""

    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        if cfg.method.name not in METHODS:
            raise ConfigError(f"unknown method.name {cfg.method.name!r}; valid methods: {', '.join(sorted(METHODS))}")
        self.run_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tasks = resolve_tasks(cfg.data)
        self.bf16 = cfg.train.bf16 == "true" or (cfg.train.bf16 == "auto" and info.device.type == "cuda")
        check_task_overrides(cfg.task_overrides, self.tasks)
        check_pretrained_tasks(cfg, self.tasks)
        for task in self.tasks:  # a CLIP score without CLIP or decoder fails now, not after the first task
            check_eval_config(cfg.for_task(task.name).eval, task, cfg.model.decoder_path)
        check_engine(cfg.train, info.device)
        self.data_root = prepare_data(cfg.data, info, self.tasks)
        # Same seed on every rank for the weights; per-rank streams below for dropout.
        torch.manual_seed(cfg.train.seed)
        self.model = build_trainable_model(cfg, info.device)
        self.method = build_method(cfg.method.name, cfg.method, self.model)
        # fp32 master weights in the model itself (mage/trainer/engine.py): bf16 only for the frozen weights.
        trainables_to_fp32_(p for _, p in [*lora_group_params(self.model), *self.method.extras])
        self.log = RunLogger(self.run_dir, [t.name for t in self.tasks], cfg.run, info.is_main)
        self.progress = Progress()
        self.resume_state: dict | None = None
        self._crash_at = os.environ.get(CRASH_ENV)

    # -- checkpoints
    def _save(self, tag: str, engine: DDPEngine | None, stream: TrainStream | None) -> None:
        """All ranks call this; rank 0 writes (ranks hold identical weights and EMA)."""
        rngs = [None] * self.info.world_size
        if self.info.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        tensors = model_tensors(self.model, self.method)
        sharded = engine is not None and engine.sharded_state
        if sharded:  # ZeRO: each rank owns a partition of the optimizer state
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            engine.save_sharded(self.ckpt_dir, tag)
            barrier()
        if self.info.is_main:
            p = self.progress
            state = {
                "format": 1, "config": self.cfg.flat(), "world_size": self.info.world_size,
                "task": p.task, "step": p.step, "zero_shot": p.zero_shot, "rows": p.rows, "labels": p.labels,
                "nonfinite": p.nonfinite,
                "rng": rngs,
                "engine": None if engine is None else ("per-rank" if sharded else engine.state_dict()),
                "stream": stream.state_dict() if stream is not None else None,
            }
            save_checkpoint(self.ckpt_dir, tag, tensors, state)
            prune_mid_task(self.ckpt_dir, tag)
            prune_engine_shards(self.ckpt_dir, tag if sharded else None)
        barrier()

    def _restore(self) -> None:
        loaded = load_checkpoint(self.ckpt_dir)
        if loaded is None:
            return
        tensors, state = loaded
        diffs = config_differences(state["config"], self.cfg)
        if diffs:
            raise CheckpointError(
                f"{self.ckpt_dir} holds a checkpoint of a different configuration:\n  " + "\n  ".join(diffs) +
                f"\nResume with the same settings, or start a new run with --run.out_dir OTHER_DIR "
                f"(or delete {self.run_dir}).")
        if state["world_size"] != self.info.world_size:
            raise CheckpointError(
                f"the checkpoint in {self.ckpt_dir} was written by {state['world_size']} processes and this run "
                f"has {self.info.world_size}; the data shards and RNG streams depend on it. Resume with "
                f"--nproc-per-node/--nnodes giving {state['world_size']} processes, or use another --run.out_dir.")
        self.progress = Progress(task=state["task"], step=state["step"], zero_shot=state["zero_shot"],
                                 rows=state["rows"], labels=state["labels"], nonfinite=state.get("nonfinite", 0))
        # Every LoRA group, the non-LoRA trainables and the Fisher buffers.
        load_model_tensors_(self.model, self.method, tensors)
        method_state = {k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")}
        if state["step"] == 0:
            # A task boundary: only state that spans tasks (e.g. F_prev); the next task starts afresh.
            self.method.load_state_dict(method_state)
        else:
            # Mid-task: the method's per-task state is loaded once that task has started.
            self.resume_state = {"method": method_state, "state": state}
        self.log.message(f"resuming from {self.ckpt_dir} at task {state['task'] + 1}, step {state['step']}")

    # -- evaluation
    def _eval_for(self, task: str):
        return self.cfg.for_task(task).eval

    def _evaluate_row(self, after: int) -> list[float]:
        scores, labels = evaluate_tasks(self.model, self.tasks, self.data_root, self.cfg.eval, self.info, self.bf16,
                                        progress=self.log.eval_bar(after), eval_for=self._eval_for,
                                        data_cfg=self.cfg.data, decoder_path=self.cfg.model.decoder_path,
                                        generator=self.method.generator())
        if after >= 1:  # keyed by the 0-based index of the last trained task
            for i, lab in labels.items():
                self.progress.labels[f"{after - 1},{i}"] = lab
        self.log.eval_row(after, scores)
        return scores

    # -- training one task
    def _train_task(self, k: int) -> None:
        if self.method.schedule == "joint":
            # One phase on every task's data mixed, with the sequence's total step budget (per-task
            # overrides count only through their steps) and the union of the tasks' LoRA groups.
            task, cfg = list(self.tasks), self.cfg
            total = sum(self.cfg.for_task(t.name).train.steps_per_task for t in self.tasks)
            groups = tuple(sorted({g for t in self.tasks for g in t.lora_groups}))
        else:
            task = self.tasks[k]
            if task.name in self.cfg.data.pretrained_tasks:  # trained by model.init_from: evaluated, not retrained
                self.log.message(f"task {k + 1} ({task.name}): taken from {self.cfg.model.init_from}, not retrained")
                return
            cfg = self.cfg.for_task(task.name)
            total, groups = cfg.train.steps_per_task, task.lora_groups
        self.method.steps_in_task = total
        self.method.on_task_start(groups)
        engine = build_engine(self.model, self.method.param_groups(cfg.optim.weight_decay), cfg.optim, cfg.train,
                              total, self.info)
        stream = TrainStream(task, self.data_root, self.model, batch_size=cfg.train.batch_size,
                             seed=cfg.train.seed, rank=self.info.rank, world_size=self.info.world_size,
                             num_workers=cfg.data.num_workers, data_cfg=cfg.data)
        resume = self.resume_state
        if resume is not None and resume["state"]["task"] == k:
            st = resume["state"]
            self.method.load_state_dict(resume["method"])
            if st["engine"] == "per-rank":
                engine.load_sharded(self.ckpt_dir, read_latest(self.ckpt_dir)["tag"])
            else:
                engine.load_state_dict(st["engine"])
            stream.load_state_dict(st["stream"])
            set_rng_state(st["rng"][self.info.rank])
        else:
            torch.manual_seed(cfg.train.seed * 1000 + k * 97 + self.info.rank)  # per-task, per-rank dropout stream
        self.resume_state = None

        self.model.train()
        autocast = torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        bar = self.log.task_bar(k, total, initial=self.progress.step)
        for step in range(self.progress.step, total):
            loss_sum = torch.zeros((), device=self.info.device)
            for micro in range(cfg.train.grad_accum):
                last = micro == cfg.train.grad_accum - 1
                batch = to_device(stream.next_batch(), self.info.device)
                with engine.accumulating(last):
                    self.method.before_backward(batch["input_ids"].shape[0], cfg.train.grad_accum)
                    with autocast:
                        out = engine.forward(batch)
                    penalty = self.method.loss_penalty()  # e.g. EWC's, on the live parameters
                    engine.backward(out.loss if penalty is None else out.loss + penalty, last)
                loss_sum += out.loss.detach()
            if engine.step_is_finite(loss_sum):  # the step's one host sync (see the engine)
                self.method.before_clip(engine.grad_of)
                grad_norm = engine.clip()
                engine.step()
                self.method.after_optimizer_step()
            else:
                grad_norm = None
                self._skip_nonfinite_step(k, step + 1, engine, cfg.train.max_nonfinite_steps)
            self.progress.step = step + 1
            if self.log.wants(step + 1, total):
                # .item() syncs the device: only on logging steps.
                self.log.train_step(k, step + 1, (loss_sum / cfg.train.grad_accum).item(),
                                    None if grad_norm is None else grad_norm.item(), engine.lr())
            bar.update(1)
            every = self.cfg.run.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < total:
                self._save(f"task{k + 1:02d}_step{step + 1:06d}", engine, stream)
            self._maybe_crash(k, step + 1)
        bar.close()
        self.method.on_task_end()
        # Drop this task's DDP wrapper now: a lingering reducer would keep hooks on the parameters.
        del engine
        gc.collect()

        def loss_of(batch: dict) -> torch.Tensor:
            with autocast:
                return self.model(batch).loss

        self.model.eval()  # the task-end data pass (EWC Fisher, PGP bases): no dropout, whole micro-batches
        per_rank = cfg.train.batch_size * self.info.world_size
        self.method.on_task_end_data(
            lambda n: (to_device(stream.next_batch(), self.info.device) for _ in range(-(-n // per_rank))), loss_of)

    def _skip_nonfinite_step(self, k: int, step: int, engine: DDPEngine, limit: int) -> None:
        """Optimizer, EMA, Fisher and method state stay as before the step; its data is consumed."""
        engine.skip_step()
        self.method.discard_step()
        p = self.progress
        p.nonfinite += 1
        self.log.message(f"task {k + 1} ({self.tasks[k].name}) step {step}: non-finite loss or gradient, step skipped "
                         f"({p.nonfinite} in this task; train.max_nonfinite_steps={limit})")
        if p.nonfinite > limit:
            raise NonFiniteStepsError(
                f"task {k + 1} ({self.tasks[k].name}) had {p.nonfinite} steps with a non-finite loss or gradient "
                f"(the last at step {step}), more than train.max_nonfinite_steps={limit}: training has diverged. "
                "Check this task's data, or lower optim.lr and start a new run (--run.out_dir); to go on past "
                "these steps, rerun the same command with a higher train.max_nonfinite_steps (it resumes from "
                "the last checkpoint).")

    def _maybe_crash(self, k: int, step: int) -> None:
        if self._crash_at == f"{k + 1}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    # -- the sequence
    def run(self) -> dict:
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        self._restore()
        if self.info.is_main:
            save_config(self.cfg, self.run_dir / "config.json")
        start = time.perf_counter()
        p = self.progress
        schedule = self.method.schedule
        phases = {"sequential": len(self.tasks), "joint": 1, "none": 0}[schedule]
        if (self.cfg.eval.zero_shot or schedule == "none") and p.zero_shot is None and p.task == 0 and p.step == 0:
            p.zero_shot = self._evaluate_row(0)
        if schedule == "none":  # the zero-shot row is the result
            p.rows = [list(p.zero_shot)]
        seq_bar = self.log.sequence_bar(phases, initial=p.task)
        for k in range(p.task, phases):
            self._train_task(k)
            p.rows.append(self._evaluate_row(k + 1))
            p.task, p.step, p.nonfinite = k + 1, 0, 0
            self._save(f"task{k + 1:02d}_end", None, None)
            self._write_reports()
            seq_bar.update(1)
        seq_bar.close()
        metrics = self._write_reports()
        self.log.finish(time.perf_counter() - start)
        return {"tasks": [t.name for t in self.tasks], "zero_shot": p.zero_shot, "matrix": p.rows,
                "metrics": metrics, "row_labels": self._row_labels()}

    def _row_labels(self) -> list[str] | None:
        label = SINGLE_ROW_LABELS.get(self.method.schedule)
        return None if label is None else [label] * len(self.progress.rows)

    def _write_reports(self) -> dict:
        p = self.progress
        if not p.rows:
            return {}
        if self.method.schedule != "sequential":
            metrics = single_phase_metrics(p.rows[-1])
            if self.info.is_main:
                write_reports(self.run_dir, [x.name for x in self.tasks], p.rows, p.zero_shot, metrics,
                              scorers=scorer_names(self.tasks, self._eval_for), row_labels=self._row_labels())
            return metrics
        metrics = compute_metrics(p.rows, p.zero_shot if self.cfg.eval.zero_shot else None)
        # Error-type forgetting (Eqs. 8-10) over ALL earlier tasks, image tasks included (docs/METHOD.md section 6);
        # left out (n/a) rather than averaged over a subset when some labels are missing.
        labels, last = p.error_labels(), len(p.rows) - 1
        earlier = range(last)
        if last >= 1 and all((i, i) in labels and (last, i) in labels for i in earlier):
            metrics.update(error_type_forgetting([labels[(last, i)] for i in earlier],
                                                 [labels[(i, i)] for i in earlier]))
        if self.info.is_main:
            write_reports(self.run_dir, [x.name for x in self.tasks], p.rows, p.zero_shot, metrics,
                          scorers=scorer_names(self.tasks, self._eval_for))
        return metrics


def run_sequence(cfg: Config, info: DistInfo) -> dict:
    result = SequenceTrainer(cfg, info).run()
    if info.is_main:
        print("\nAccuracy matrix (rows: after training task j; columns: tasks)")
        print(format_matrix(result["tasks"], result["matrix"], result["zero_shot"], result["row_labels"]))
        print()
        print(format_metrics(result["metrics"]))
    return result
