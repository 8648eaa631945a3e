"""benchmarks/tasks_alone.py: each task trained alone; the table of zero-shot and trained scores per task."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def alone():
    return load_benchmark("tasks_alone")


def fake_run(folder: Path, zero: float, trained: float) -> None:
    folder.mkdir(parents=True)
    (folder / "accuracy_matrix.json").write_text(json.dumps({"matrix": [[trained]], "zero_shot": [zero]}))


def test_results_are_per_task_and_steps_over_seeds(alone, tmp_path):
    runs = tmp_path / "runs"
    fake_run(alone.run_folder(runs, "ocrvqa", 200, 1), 23.5, 30.0)
    fake_run(alone.run_folder(runs, "ocrvqa", 200, 2), 23.5, 34.0)
    fake_run(alone.run_folder(runs, "hqedit", 200, 1), 25.8, 50.0)
    grid = [("ocrvqa", 200, 1), ("ocrvqa", 200, 2), ("ocrvqa", 200, 3), ("hqedit", 200, 1)]  # seed 3 unfinished
    assert alone.scores(alone.run_folder(runs, "ocrvqa", 200, 3)) is None
    alone.write_results(tmp_path / "out", runs, grid, "cmd", "abc1234", "a machine")
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert [(r["task"], r["seed"], float(r["trained"])) for r in rows] == [
        ("ocrvqa", "1", 30.0), ("ocrvqa", "2", 34.0), ("hqedit", "1", 50.0)]
    assert {(r["commit"], r["machine"]) for r in rows} == {("abc1234", "a machine")}
    md = (tmp_path / "out.md").read_text()
    assert "Commit: abc1234; machine: a machine" in md
    assert "| OCRVQA | 200 | 1,2 | 23.50 ± 0.00 | 32.00 ± 2.83 | >= 60 |" in md
    assert "| HQEdit | 200 | 1 | 25.80 | 50.00 | > zero-shot |" in md
