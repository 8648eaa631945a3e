"""The trainer's view of mage.data: the task list, the data root (generated if asked), batch streams."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from mage.data.dataset import build_dataloader
from mage.data.images import ImageConfig
from mage.data.readers import ReaderOptions, load_train_records, preflight
from mage.data.tasks import TASK_NAMES, TaskSpec, get_task, task_order
from mage.trainer.config import ConfigError
from mage.trainer.distributed import DistInfo, barrier


def resolve_tasks(cfg) -> list[TaskSpec]:
    """The task sequence of a DataConfig: ``tasks`` when given, else the named ``order``."""
    try:
        names = task_order(list(cfg.tasks)) if cfg.tasks else task_order(cfg.order)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"data.tasks/data.order: {e.args[0]}") from None
    return [get_task(n) for n in names]


def check_task_overrides(overrides: dict, tasks: list[TaskSpec]) -> None:
    unknown = sorted(set(overrides) - set(TASK_NAMES))
    if unknown:
        raise ConfigError(f"task_overrides name unknown task(s) {unknown}; valid tasks: {', '.join(TASK_NAMES)}")


def check_pretrained_tasks(cfg, tasks: list[TaskSpec]) -> None:
    """data.pretrained_tasks must be the first tasks of the sequence and need model.init_from."""
    names = [t.name for t in tasks]
    try:
        done = [get_task(n).name for n in cfg.data.pretrained_tasks]
    except KeyError as e:
        raise ConfigError(f"data.pretrained_tasks: {e.args[0]}") from None
    if done and not cfg.model.init_from:
        raise ConfigError(f"data.pretrained_tasks {done} are taken from a checkpoint: set model.init_from")
    if done != names[:len(done)]:
        raise ConfigError(f"data.pretrained_tasks {done} must be the first task(s) of the sequence {names}")


def prepare_data(cfg, info: DistInfo, tasks: list[TaskSpec]) -> Path:
    """The data root, checked; Continual-NExT-mini is generated there first when it is absent and allowed."""
    root = Path(cfg.root)
    if not root.exists() and cfg.generate_mini:
        if info.is_main:
            from mage.data.mini import generate

            print(f"generating Continual-NExT-mini (seed {cfg.mini_seed}) in {root} ...", flush=True)
            root.parent.mkdir(parents=True, exist_ok=True)
            # Written beside the target and renamed: an interrupted generation never looks complete.
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
            try:
                generate(tmp, seed=cfg.mini_seed)
                tmp.rename(root)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not root.is_dir():
                    raise
                # Another run sharing the data root generated the same files first: use those.
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        barrier()
    preflight([t.name for t in tasks], root, options=reader_options(cfg))
    return root


def reader_options(cfg) -> ReaderOptions:
    """The readers' choices of a DataConfig (official filter and prompt, or the mini defaults)."""
    try:
        return ReaderOptions(edit_filter=cfg.edit_filter, generation_prompt=cfg.generation_prompt)
    except ValueError as e:
        raise ConfigError(f"data.generation_prompt: {e}") from None


def image_config(model, task: str | None = None, per_task_grids: bool = False) -> ImageConfig:
    """The image views of a model (global only on tiny, any resolution on the real one); with
    `per_task_grids`, the tasks SEED-X runs on the 1x1 grid only (Flickr30k, HQEdit) get that grid."""
    cfg = ImageConfig.tiny() if model.config.name == "tiny" else ImageConfig.real()
    if cfg.num_query_tokens != model.num_image_tokens:
        raise ValueError(f"image config gives {cfg.num_query_tokens} tokens per view but model "
                         f"{model.config.name!r} expects {model.num_image_tokens}")
    return cfg.for_task(task) if per_task_grids and task is not None else cfg


# Shuffle seed offset of the joint stream (all tasks mixed); single tasks use their index 0..5.
JOINT_SEED_OFFSET = 997


class TrainStream:
    """An endless, resumable stream of training batches of one task (epoch after epoch), or of several tasks'
    records shuffled together (joint training) when ``task`` is a list."""

    def __init__(self, task: TaskSpec | list[TaskSpec], root: Path, model, *, batch_size: int, seed: int, rank: int,
                 world_size: int, num_workers: int = 0, data_cfg=None):
        tasks = list(task) if isinstance(task, (list, tuple)) else [task]
        options = reader_options(data_cfg) if data_cfg is not None else None
        per_task_grids = bool(data_cfg is not None and data_cfg.per_task_grids)
        if per_task_grids and len(tasks) > 1:
            raise ValueError("data.per_task_grids with joint training: the tasks' grids differ within one stream; "
                             "turn per_task_grids off for the joint method")
        records = [r for t in tasks for r in load_train_records(t.name, root, options)]
        # Each task shuffles with its own seed, so task order does not change a task's batches.
        offset = TASK_NAMES.index(tasks[0].name) if len(tasks) == 1 else JOINT_SEED_OFFSET
        self.loader = build_dataloader(records, model.tokenizer, image_config(model, tasks[0].name, per_task_grids),
                                       batch_size, seed=seed * 1000 + offset, mode="train", rank=rank,
                                       world_size=world_size, num_workers=num_workers,
                                       polite_reply=bool(data_cfg is not None and data_cfg.polite_reply),
                                       cache_images=bool(data_cfg is not None and data_cfg.cache_images))
        self._it = None

    def _first_of_new_epoch(self) -> dict:
        # A DataLoader iterator draws its base seed from the global RNG; keep that draw out of the
        # training stream (dropout), or a resumed run, which starts its iterator at another point,
        # would diverge from the uninterrupted one. Two tries: a resumed epoch may have nothing left.
        for _ in range(2):
            with torch.random.fork_rng(devices=[]):
                self._it = iter(self.loader)
                batch = next(self._it, None)
            if batch is not None:
                return batch
        raise RuntimeError("the training loader yielded no batch in a fresh epoch")

    def next_batch(self) -> dict:
        batch = next(self._it, None) if self._it is not None else None
        return batch if batch is not None else self._first_of_new_epoch()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
