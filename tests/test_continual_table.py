"""benchmarks/continual_table.py: aggregation of finished runs into the CSV, the Markdown table and the figure."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from mage.data.tasks import task_order
from mage.trainer.report import compute_metrics, write_reports

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("continual_table", REPO / "benchmarks" / "continual_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, offset: float) -> None:
    tasks = list(task_order("default"))
    rows = [[10.0 * (i == j) + offset + j for i in range(6)] for j in range(6)]
    zero = [1.0] * 6
    write_reports(folder, tasks, rows, zero, compute_metrics(rows, zero))


def test_mean_std_and_layout(table, tmp_path):
    runs = tmp_path / "runs"
    for seed, offset in ((1, 0.0), (2, 2.0)):
        fake_run(table.run_dir(runs, "mage:fisher", "default", seed), offset)
    (table.run_dir(runs, "lora", "default", 1)).mkdir(parents=True)  # unfinished: left out
    rows = table.collect(runs, ["mage:fisher", "lora"], ["default"], [1, 2])
    assert [(r["method"], r["seed"]) for r in rows] == [("mage:fisher", 1), ("mage:fisher", 2)]
    # diagonal of seed 1: 10 + j; final row: offset + 5 (+ 10 on the last task)
    assert rows[0]["diag_vqav2"] == 10.0 and rows[0]["final_vqav2"] == 5.0 and rows[1]["final_vqav2"] == 7.0
    out = tmp_path / "t"
    table.write_csv(out.with_suffix(".csv"), rows, "abc", "test machine")
    table.write_markdown(out.with_suffix(".md"), rows, ["mage:fisher", "lora"], ["default"], "cmd", "abc", "m")
    table.write_figure(out.with_suffix(".png"), rows, ["mage:fisher", "lora"])
    with out.with_suffix(".csv").open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == 2 and json.loads(written[0]["matrix"])[0][0] == 10.0
    md = out.with_suffix(".md").read_text()
    avg = [r["avg_acc"] for r in rows]
    assert f"| mage:fisher | 1,2 | {sum(avg) / 2:.2f} ± {abs(avg[0] - avg[1]) / 2 ** 0.5:.2f} |" in md
    assert "| mage:fisher | after its task |" in md and "lora |" not in md.split("## Order")[1].split("Per task")[0]
    assert out.with_suffix(".png").stat().st_size > 0


def test_method_spec_parsing(table):
    assert table.parse_method("mage:paper") == ("mage", ["--method.pema_mode", "paper"])
    assert table.parse_method("lora") == ("lora", [])
