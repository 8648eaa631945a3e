"""benchmarks/continual_table.py: aggregation of finished runs into the CSV, the Markdown table and the figure."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mage.data.tasks import task_order
from mage.eval.metrics import single_phase_metrics
from mage.trainer.report import compute_metrics, write_reports
from tests.benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def table():
    return load_benchmark("continual_table")


def fake_run(folder: Path, offset: float, order: str = "default") -> None:
    tasks = list(task_order(order))
    rows = [[10.0 * (i == j) + offset + j for i in range(6)] for j in range(6)]
    zero = [1.0] * 6
    # every earlier task: right after its own task all correct; after the last one, 1 HAL and 1 IUF out of 4
    labels = {(i, i): ["correct"] * 4 for i in range(5)}
    labels |= {(5, i): ["HAL", "IUF", "correct", "correct"] for i in range(5)}
    write_reports(folder, tasks, rows, zero, compute_metrics(rows, zero, labels))


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
    table1 = md.split("## Table 1: every method, default order")[1]
    assert "| mage:fisher | after its task |" in md and "lora |" not in table1.split("Per task")[0]
    assert out.with_suffix(".png").stat().st_size > 0


def test_method_spec_parsing(table):
    assert table.parse_method("mage:paper") == ("mage", ["--method.pema_mode", "paper"])
    assert table.parse_method("lora") == ("lora", [])


def fake_joint_run(folder: Path) -> None:
    """A single-row run (joint): Forgetting and the error types are None."""
    row = [20.0 + i for i in range(6)]
    write_reports(folder, list(task_order("default")), [row], [1.0] * 6, single_phase_metrics(row),
                  row_labels=["joint"])


def paper_markdown(table, tmp_path, methods, orders, runs_wanted) -> str:
    runs = tmp_path / "runs"
    for method, order in runs_wanted:
        for seed, offset in ((1, 0.0), (2, 1.0)):
            if method == "joint":
                fake_joint_run(table.run_dir(runs, method, order, seed))
            else:
                fake_run(table.run_dir(runs, method, order, seed), offset, order)
    rows = table.collect(runs, methods, orders, [1, 2])
    path = tmp_path / "t.md"
    table.write_markdown(path, rows, methods, orders, "cmd", "abc", "m")
    return path.read_text()


def section(md: str, title: str) -> str:
    """The text of one `## title` section (empty if absent)."""
    parts = md.split(f"## {title}")
    return parts[1].split("\n## ")[0] if len(parts) > 1 else ""


def table_methods(text: str) -> list[str]:
    return [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_paper_tables(table, tmp_path):
    methods = ["joint", "lora", "ew", "ew_ga", "mage", "moelora"]
    wanted = [(m, "default") for m in methods] + [("mage", "reverse")]
    md = paper_markdown(table, tmp_path, methods, ["default", "reverse"], wanted)
    t1 = section(md, "Table 1: every method, default order")
    assert table_methods(t1.split("Per task")[0]) == methods
    assert "| joint | 1,2 | 22.50 ± 0.00 | n/a |" in t1  # no forgetting for a single-row method
    assert "## Order: reverse" in md
    t2 = section(md, "Table 2: error types of forgetting")
    assert table_methods(t2) == ["lora", "mage", "moelora"] and "Avg.HAL | Avg.IUF | Avg.OTH" in t2
    assert "were not errors of type X right after their own task" in t2
    assert "| lora | 1,2 | 25.00 ± 0.00 | 25.00 ± 0.00 | 0.00 ± 0.00 |" in t2
    t4 = section(md, "Table 4: ablations")
    assert table_methods(t4) == ["ew", "ew_ga", "mage"] and "Avg.ACC | Forgetting | New.ACC |" in t4
    t5 = section(md, "Table 5: task orders")
    assert table_methods(t5) == ["mage", "mage"]
    assert "| mage | reverse | HQEdit → RefCOCO → OCRVQA → Flickr30k → ImageNet → VQAv2 | 1,2 |" in t5
    assert "| mage | default | VQAv2 → ImageNet" in t5


def test_paper_tables_absent_without_their_rows(table, tmp_path):
    # joint and ew_ga only, one order: no error-type table, no order table; Table 4 still has ew_ga
    md = paper_markdown(table, tmp_path, ["joint", "ew_ga"], ["default"], [("joint", "default"), ("ew_ga", "default")])
    assert "## Table 1: every method, default order" in md and "## Table 4: ablations" in md
    assert "## Table 2" not in md and "## Table 5" not in md
    # mage alone: Table 2 yes, Table 4 needs an ablation (ew or ew_ga), so no
    md = paper_markdown(table, tmp_path / "b", ["mage:fisher"], ["default"], [("mage:fisher", "default")])
    assert table_methods(section(md, "Table 2: error types of forgetting")) == ["mage:fisher"]
    assert "## Table 4" not in md and "## Table 5" not in md
    # reverse order only: no default-order tables at all
    md = paper_markdown(table, tmp_path / "c", ["lora"], ["reverse"], [("lora", "reverse")])
    assert "## Order: reverse" in md and "## Table" not in md


def test_preset_parsing(table):
    paper = "zero_shot,joint,lora,ew,ew_ga,mage,moelora,lae,ewc,pgp,cia,reglora".split(",")
    assert table.resolve_lists(None, None, None) == (table.DEFAULT_METHODS.split(","), ["default"])
    assert table.resolve_lists("paper", None, None) == (paper, ["default"])
    assert table.resolve_lists("orders", None, None) == (["mage"], ["default", "reverse", "alphabetical"])
    assert table.resolve_lists("orders", "lora, ew", None) == (["lora", "ew"], ["default", "reverse", "alphabetical"])
    assert table.resolve_lists("paper", None, "reverse") == (paper, ["reverse"])


def test_a_finished_run_with_other_settings_is_reported_not_reused(table, tmp_path):
    from mage.trainer.config import load_config, parse_cli, save_config

    folder = table.run_dir(tmp_path, "mage:fisher", "default", 1)
    folder.mkdir(parents=True)
    args = table.train_args("mage:fisher", "default", 1, folder, ["optim.lr=1e-3"], "mini")
    preset, overrides = parse_cli(args)
    save_config(load_config(preset, overrides), folder / "config.json")
    assert table.stale_settings(folder, args) == []
    # The same folder read as another mode's, or with another lr: both differences are named.
    other = table.train_args("mage:fixed", "default", 1, folder, ["optim.lr=8e-4"], "mini")
    diffs = table.stale_settings(folder, other)
    assert any(d.startswith("method.pema_mode: 'fisher'") for d in diffs)
    assert any(d.startswith("optim.lr: 0.001") for d in diffs)


def test_another_methods_knob_does_not_make_a_finished_run_stale(table, tmp_path):
    """MAGE's horizon changed in the preset: a finished lora run is still this table's, a mage run is not."""
    from mage.trainer.config import load_config, parse_cli, save_config

    for method in ("lora", "mage:fisher"):
        folder = table.run_dir(tmp_path, method, "default", 1)
        folder.mkdir(parents=True)
        before = table.train_args(method, "default", 1, folder, ["method.pema_horizon=0.5"], "mini")
        save_config(load_config(*parse_cli(before)), folder / "config.json")
        after = table.train_args(method, "default", 1, folder, ["method.pema_horizon=2.0"], "mini")
        diffs = table.stale_settings(folder, after)
        assert diffs == ([] if method == "lora" else ["method.pema_horizon: 0.5 in the checkpoint, 2.0 now"])


def test_rows_of_an_earlier_csv_are_counted_with_their_own_commit(table, tmp_path):
    """--with-rows: seed 1 from an earlier table's CSV (its runs deleted), seed 2 run here."""
    runs = tmp_path / "runs"
    fake_run(table.run_dir(runs, "lora", "default", 1), 0.0)
    earlier = table.collect(runs, ["lora"], ["default"], [1])
    table.write_csv(tmp_path / "earlier.csv", earlier, "old1234", "machine A")
    read = table.rows_from_csv(tmp_path / "earlier.csv")
    assert {k: v for k, v in read[0].items() if k not in ("commit", "machine")} == earlier[0]
    assert (read[0]["commit"], read[0]["machine"]) == ("old1234", "machine A")

    fresh = tmp_path / "fresh"
    fake_run(table.run_dir(fresh, "lora", "default", 2), 2.0)
    fake_run(table.run_dir(fresh, "lora", "default", 1), 5.0)  # a local run beats the CSV's row
    local = table.collect(fresh, ["lora"], ["default"], [2])
    merged = table.merge_rows(local, read, ["lora"], ["default"], [1, 2])
    assert [(r["seed"], r.get("commit")) for r in merged] == [(1, "old1234"), (2, None)]
    assert table.merge_rows(table.collect(fresh, ["lora"], ["default"], [1, 2]), read, ["lora"], ["default"],
                            [1, 2])[0]["final_vqav2"] == 10.0  # local seed 1: offset 5 + 5
    assert table.merge_rows([], read, ["lora"], ["default"], [2]) == []  # seed 1 not asked for
    table.write_csv(tmp_path / "merged.csv", merged, "new5678", "machine B")
    written = list(csv.DictReader(open(tmp_path / "merged.csv")))
    assert [(w["seed"], w["commit"], w["machine"]) for w in written] == [
        ("1", "old1234", "machine A"), ("2", "new5678", "machine B")]
    table.write_markdown(tmp_path / "merged.md", merged, ["lora"], ["default"], "cmd", "new5678", "machine B")
    assert "Seed 1 of some rows were measured earlier (--with-rows): commit old1234; machine: machine A." in (
        tmp_path / "merged.md").read_text()
