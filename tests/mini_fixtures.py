"""A small Continual-NExT-mini data root for trainer tests (one per test module, written once)."""
from __future__ import annotations

from pathlib import Path


def write_mini(tmp_path_factory, tasks: list[str] | tuple[str, ...], train_per_task: int, test_per_task: int) -> Path:
    from mage.data.mini import generate

    root = tmp_path_factory.mktemp("mini") / "data"
    generate(root, seed=0, train_per_task=train_per_task, test_per_task=test_per_task, tasks=list(tasks))
    return root
