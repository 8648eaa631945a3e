"""Each Continual-NExT-mini task trained alone from the base with plain LoRA: is every task learnable?

    python benchmarks/tasks_alone.py                                  # the six tasks, the preset's steps, seeds 1-3
    python benchmarks/tasks_alone.py --tasks vqav2,ocrvqa --steps 200,800 --seeds 11

Each (task, steps, seed) is one `python train.py --method.name lora --data.tasks TASK` run with one thread,
--jobs at a time, in its own folder under --runs-dir; a finished run is never redone. The zero-shot score
and the score after training are rewritten after each run to benchmarks/results/tasks_alone.{csv,md},
mean +- std over seeds per (task, steps). A task's score in the continual table's diagonal is not this:
there every task but the first starts from the previous tasks' LoRA.

The target column is the benchmark's learnability bar: a task answered in words (VQAv2, ImageNet, OCRVQA,
exact match) reaches 60; a task answered with a box (RefCOCO) or an image (Flickr30k, HQEdit) clearly beats
its zero-shot score.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from continual_table import machine_name, mean_std, run_all, run_train  # noqa: E402

from mage.data.tasks import TASK_NAMES, get_task  # noqa: E402
from mage.provenance import git_commit  # noqa: E402
from mage.trainer.config import load_config  # noqa: E402

COLUMNS = ("task", "steps", "seed", "zero_shot", "trained", "minutes", "commit", "machine")


def run_folder(runs: Path, task: str, steps: int, seed: int) -> Path:
    return runs / task / f"steps{steps}" / f"seed{seed}"


def scores(folder: Path) -> tuple[float, float] | None:
    """(zero-shot, after training) of a finished run, or None."""
    path = folder / "accuracy_matrix.json"
    if not path.is_file():
        return None
    acc = json.loads(path.read_text())
    return acc["zero_shot"][0], acc["matrix"][-1][0]


def run_one(task: str, steps: int, seed: int, runs: Path, sets: list[str]) -> float:
    folder = run_folder(runs, task, steps, seed)
    args = ["--method.name", "lora", "--data.tasks", task, "--train.steps_per_task", str(steps),
            "--train.seed", str(seed), "--run.out_dir", str(folder), "--run.progress", "false",
            "--run.tensorboard", "false"]
    for s in sets:
        args += ["--set", s]
    return run_train(args, folder, f"{task} {steps} steps seed {seed}")


def write_results(out: Path, runs: Path, grid: list[tuple[str, int, int]], command: str, commit: str,
                  machine: str) -> None:
    rows = []
    for task, steps, seed in grid:
        folder = run_folder(runs, task, steps, seed)
        got = scores(folder)
        if got is None:
            continue
        minutes = folder / "wall_minutes.txt"
        rows.append({"task": task, "steps": steps, "seed": seed, "zero_shot": got[0], "trained": got[1],
                     "minutes": float(minutes.read_text()) if minutes.is_file() else None,
                     "commit": commit, "machine": machine})
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["# Each task trained alone from the base (plain LoRA)", "", f"Command: `{command}`  ",
             f"Commit: {commit}; machine: {machine}", "",
             "| task | steps | seeds | zero-shot | after training alone | target |", "|---|---|---|---|---|---|"]
    for task, steps in dict.fromkeys((t, s) for t, s, _ in grid):
        rs = [r for r in rows if r["task"] == task and r["steps"] == steps]
        if not rs:
            continue
        target = ">= 60" if get_task(task).scorer == "exact_match" else "> zero-shot"
        lines.append(f"| {get_task(task).title} | {steps} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{mean_std([r['zero_shot'] for r in rs])} | {mean_std([r['trained'] for r in rs])} | {target} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated (default: all six)")
    p.add_argument("--steps", default=None, help="comma-separated steps per run (default: the mini preset's)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="runs at once (one thread each)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--name", default="tasks_alone", help="results are benchmarks/results/<name>.{csv,md}")
    p.add_argument("--runs-dir", default=None, help="run folders (default runs/<name>)")
    a = p.parse_args(argv)
    tasks = [get_task(t).name for t in a.tasks.split(",") if t.strip()]
    steps = a.steps or str(load_config("mini", {}).train.steps_per_task)
    grid = [(t, int(s), int(seed)) for t in tasks for s in steps.split(",") for seed in a.seeds.split(",")]
    runs = Path(a.runs_dir or REPO / "runs" / a.name)
    out = REPO / "benchmarks" / "results" / a.name
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/tasks_alone.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # Read once, before any result file is written: an untracked result file would read as "+dirty".
    commit, machine = git_commit(), machine_name()
    todo = [g for g in grid if scores(run_folder(runs, *g)) is None]
    print(f"{len(todo)} runs to do ({len(grid) - len(todo)} already finished), {a.jobs} at a time", flush=True)
    run_all(todo, a.jobs, lambda *g: run_one(*g, runs, a.set), lambda g: " ".join(map(str, g)),
            lambda: write_results(out, runs, grid, command.strip(), commit, machine), out.with_suffix(".md"))


if __name__ == "__main__":
    main()
