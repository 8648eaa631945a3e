"""Two runs that share a data root both start: the second to finish generating uses the first one's files."""
from __future__ import annotations

from pathlib import Path

import torch

import mage.data.mini as mini
from mage.trainer.config import DataConfig
from mage.trainer.data import prepare_data
from mage.trainer.distributed import DistInfo


def test_concurrent_generation_keeps_the_first(tmp_path, monkeypatch):
    root = tmp_path / "data" / "mini-v2"

    def generate_while_another_run_finishes_first(out, seed=0, **_):
        Path(out, "mine.txt").write_text("second")
        root.mkdir(parents=True)
        (root / "theirs.txt").write_text("first")  # a non-empty root: the rename cannot replace it

    monkeypatch.setattr(mini, "generate", generate_while_another_run_finishes_first)
    got = prepare_data(DataConfig(root=str(root)), DistInfo(0, 1, 0, torch.device("cpu")), [])
    assert got == root and (root / "theirs.txt").read_text() == "first"
    assert [p.name for p in root.parent.iterdir()] == ["mini-v2"]  # the temporary copy is gone
