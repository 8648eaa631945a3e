"""What the user watches: tqdm bars (sequence, task, evaluation) and TensorBoard scalars, rank 0 only."""
from __future__ import annotations

import contextlib
from pathlib import Path

from tqdm.auto import tqdm


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger:
    def __init__(self, run_dir: Path, task_names: list[str], run_cfg, is_main: bool):
        self.tasks = task_names
        self.cfg = run_cfg
        self.is_main = is_main
        self.show = is_main and run_cfg.progress
        self.writer = None
        self._task_bar = None
        if is_main and run_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def _bar(self, **kw):
        return tqdm(dynamic_ncols=True, leave=kw.pop("leave", True), **kw) if self.show else _NoBar()

    def sequence_bar(self, total: int, initial: int):
        return self._bar(total=total, initial=initial, desc="tasks", unit="task", position=0)

    def task_bar(self, k: int, total: int, initial: int):
        self._task_bar = self._bar(total=total, initial=initial, unit="step", position=1, leave=False,
                                   desc=f"task {k + 1}/{len(self.tasks)} {self.tasks[k]}")
        return self._task_bar

    def eval_bar(self, after: int):
        label = "zero-shot" if after == 0 else f"after {self.tasks[after - 1]}"
        return lambda total: self._bar(total=total, desc=f"eval {label}", unit="task", position=1, leave=False)

    def wants(self, step: int, total: int) -> bool:
        every = self.cfg.log_every
        return bool(every) and (step % every == 0 or step == total)

    def train_step(self, k: int, step: int, loss: float, grad_norm: float | None, lr: float) -> None:
        if self._task_bar is not None:
            self._task_bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.writer is not None:
            tag = f"train/{k + 1:02d}_{self.tasks[k]}"
            self.writer.add_scalar(f"{tag}/loss", loss, step)
            self.writer.add_scalar(f"{tag}/lr", lr, step)
            if grad_norm is not None:
                self.writer.add_scalar(f"{tag}/grad_norm", grad_norm, step)

    def eval_row(self, after: int, scores: list[float]) -> None:
        if self.writer is not None:
            for name, s in zip(self.tasks, scores):
                self.writer.add_scalar(f"eval/{name}", s, after)
            self.writer.add_scalar("eval/mean_seen", sum(scores[:max(after, 1)]) / max(after, 1), after)
            self.writer.flush()

    def message(self, text: str) -> None:
        if self.is_main:
            (tqdm.write if self.show else print)(text)

    def finish(self, seconds: float) -> None:
        self.message(f"sequence finished in {seconds / 60:.1f} min")
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
