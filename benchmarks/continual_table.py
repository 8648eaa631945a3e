"""The continual-learning table on Continual-NExT-mini: methods x seeds (x task orders), mean +- std.

    python benchmarks/continual_table.py                                   # lora, ew_ga, mage in every PEMA mode, seeds 1-3
    python benchmarks/continual_table.py --methods lora,mage:fisher --seeds 1,2,3,4,5 --jobs 2
    python benchmarks/continual_table.py --methods mage --orders default,reverse,alphabetical
    python benchmarks/continual_table.py --set optim.lr=1e-3 --name lr1e-3  # a variant, kept apart

Every (method, seed, order) is one `python train.py` run in its own folder under --runs-dir, started
with one thread (OMP_NUM_THREADS=1), --jobs at a time. A finished run is never redone; an interrupted
one resumes from its checkpoints when the command is run again. After each run the results are
rewritten from every finished run: benchmarks/results/continual_<name>.csv (one row per run: metrics,
the diagonal and the final row, zero-shot row, minutes, commit, machine), .md (mean +- std over seeds,
the layout of the paper's Table 1) and .png (Avg.ACC per method, the final row per task).

A method is `NAME` or `NAME:PEMA_MODE` (for mage), e.g. `mage:fisher`.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mage.data.tasks import TASKS, task_order  # noqa: E402
from mage.provenance import git_commit  # noqa: E402

DEFAULT_METHODS = "lora,ew_ga,mage:paper,mage:taylor,mage:fixed,mage:fisher"
METRICS = ("avg_acc", "forgetting", "forgetting_max", "new_acc", "bwt", "fwt", "avg_hal", "avg_iuf", "avg_oth")
METRIC_LABELS = {"avg_acc": "Avg.ACC", "forgetting": "Forgetting", "forgetting_max": "Forgetting (max)",
                 "new_acc": "New.ACC", "bwt": "BWT", "fwt": "FWT", "avg_hal": "Avg.HAL", "avg_iuf": "Avg.IUF",
                 "avg_oth": "Avg.OTH"}
TITLES = {t.name: t.title for t in TASKS}


def parse_method(spec: str) -> tuple[str, list[str]]:
    """"mage:fisher" -> ("mage", ["--method.pema_mode", "fisher"])."""
    name, _, mode = spec.partition(":")
    return name, (["--method.pema_mode", mode] if mode else [])


def run_dir(runs: Path, method: str, order: str, seed: int) -> Path:
    return runs / method.replace(":", "-") / order / f"seed{seed}"


# Methods that do not train task by task write one evaluation row (mage.trainer.loop, method.schedule).
SINGLE_ROW_METHODS = ("joint", "zero_shot")


def expected_rows(method: str, num_tasks: int) -> int:
    return 1 if parse_method(method)[0] in SINGLE_ROW_METHODS else num_tasks


def finished(folder: Path, num_tasks: int, method: str = "") -> bool:
    path = folder / "accuracy_matrix.json"
    if not path.is_file():
        return False
    return len(json.loads(path.read_text())["matrix"]) == expected_rows(method, num_tasks)


def run_one(method: str, order: str, seed: int, runs: Path, sets: list[str], config: str) -> tuple[Path, float]:
    """One train.py run (resumed if it was interrupted); returns its folder and wall minutes."""
    folder = run_dir(runs, method, order, seed)
    folder.mkdir(parents=True, exist_ok=True)
    name, extra = parse_method(method)
    cmd = [sys.executable, str(REPO / "train.py"), "--config", config, "--method.name", name, *extra,
           "--train.seed", str(seed), "--data.order", order, "--run.out_dir", str(folder),
           "--run.progress", "false", "--run.tensorboard", "false", "--run.checkpoint_every", "50"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    with open(folder / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} {order} seed {seed} failed (exit {proc.returncode}); see {folder / 'train.log'}")
    minutes = (time.time() - start) / 60
    (folder / "wall_minutes.txt").write_text(f"{minutes:.2f}\n")
    return folder, minutes


def collect(runs: Path, methods: list[str], orders: list[str], seeds: list[int]) -> list[dict]:
    """One dict per finished run, in (method, order, seed) order."""
    rows = []
    for method in methods:
        for order in orders:
            tasks = list(task_order(order))
            for seed in seeds:
                folder = run_dir(runs, method, order, seed)
                if not finished(folder, len(tasks), method):
                    continue
                acc = json.loads((folder / "accuracy_matrix.json").read_text())
                metrics = json.loads((folder / "metrics.json").read_text())
                matrix, zero = acc["matrix"], acc["zero_shot"]
                row = {"method": method, "order": order, "seed": seed, "tasks": ",".join(tasks)}
                row.update({k: metrics.get(k) for k in METRICS})
                single = len(matrix) == 1 and len(tasks) > 1
                for i, t in enumerate(tasks):
                    row[f"diag_{t}"] = None if single else matrix[i][i]
                    row[f"final_{t}"] = matrix[-1][i]
                    row[f"zero_{t}"] = None if zero is None else zero[i]
                minutes = folder / "wall_minutes.txt"
                row["minutes"] = float(minutes.read_text()) if minutes.is_file() else None
                row["matrix"] = json.dumps(matrix)
                rows.append(row)
    return rows


def mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def write_csv(path: Path, rows: list[dict], commit: str, machine: str) -> None:
    keys = ["method", "order", "seed", *METRICS]
    per_task = sorted({k for r in rows for k in r if k.startswith(("diag_", "final_", "zero_"))})
    fields = keys + per_task + ["minutes", "tasks", "matrix", "commit", "machine"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "commit": r.get("commit", commit), "machine": r.get("machine", machine)})


def write_markdown(path: Path, rows: list[dict], methods: list[str], orders: list[str], command: str,
                   commit: str, machine: str) -> None:
    lines = [f"# Continual-NExT-mini: {', '.join(methods)}", "",
             f"Command: `{command}`  ", f"Commit: {commit}; machine: {machine}; "
             f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "Scores in percent; mean ± std over the seeds listed (sample std). Image tasks (Flickr30k, HQEdit) use "
             "the tiny model's stand-in score (centred feature cosine x 100), not CLIP.", ""]
    for order in orders:
        tasks = list(task_order(order))
        group = {m: [r for r in rows if r["method"] == m and r["order"] == order] for m in methods}
        group = {m: rs for m, rs in group.items() if rs}
        if not group:
            continue
        lines += [f"## Order: {order}", "", "| method | seeds | " + " | ".join(METRIC_LABELS[k] for k in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]
        for m, rs in group.items():
            lines.append(f"| {m} | {','.join(str(r['seed']) for r in rs)} | " +
                         " | ".join(mean_std([r[k] for r in rs]) for k in METRICS) + " |")
        head = "| method | row | " + " | ".join(TITLES[t] for t in tasks) + " | mean |"
        lines += ["", "Per task (the paper's Table 1 layout): zero-shot, right after training the task (diagonal), and "
                  "after the last task.", "", head, "|---|---|" + "---|" * (len(tasks) + 1)]
        for m, rs in group.items():
            for kind, label in (("zero", "zero-shot"), ("diag", "after its task"), ("final", "after the last task")):
                cells = [mean_std([r[f"{kind}_{t}"] for r in rs]) for t in tasks]
                means = [statistics.mean(r[f"{kind}_{t}"] for t in tasks) for r in rs
                         if all(r[f"{kind}_{t}"] is not None for t in tasks)]
                lines.append(f"| {m} | {label} | " + " | ".join(cells) + f" | {mean_std(means)} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_figure(path: Path, rows: list[dict], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["order"] == "default"]
    present = [m for m in methods if any(r["method"] == m for r in rows)]
    if not present:
        return
    tasks = list(task_order("default"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    for k, (key, label) in enumerate((("avg_acc", "Avg.ACC"), ("forgetting", "Forgetting"), ("new_acc", "New.ACC"))):
        values = [[r[key] for r in rows if r["method"] == m and r[key] is not None] for m in present]
        means = [statistics.mean(v) if v else 0.0 for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        xs = [i + (k - 1) * 0.27 for i in range(len(present))]
        ax1.bar(xs, means, width=0.27, yerr=stds, capsize=3, label=label)
    ax1.set_xticks(range(len(present)), present, rotation=25, ha="right")
    ax1.set_ylabel("score (%)")
    ax1.set_title("mean ± std over seeds")
    ax1.legend()
    width = 0.8 / len(present)
    for k, m in enumerate(present):
        rs = [r for r in rows if r["method"] == m]
        means = [statistics.mean(r[f"final_{t}"] for r in rs) for t in tasks]
        ax2.bar([i + k * width - 0.4 + width / 2 for i in range(len(tasks))], means, width=width, label=m)
    ax2.set_xticks(range(len(tasks)), [TITLES[t] for t in tasks], rotation=25, ha="right")
    ax2.set_title("score after the last task (mean over seeds)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}, 1 thread per run"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    p.add_argument("--seeds", default="1,2,3", help="train.seed values (default 1,2,3)")
    p.add_argument("--orders", default="default", help="task orders: default, reverse, alphabetical")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="runs at once (one thread each)")
    p.add_argument("--config", default="mini", help="preset (default mini)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--name", default="mini", help="results are benchmarks/results/continual_<name>.{csv,md,png}")
    p.add_argument("--runs-dir", default=None, help="run folders (default runs/table-<name>)")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    seeds = [int(s) for s in a.seeds.split(",")]
    orders = [o.strip() for o in a.orders.split(",")]
    runs = Path(a.runs_dir or REPO / "runs" / f"table-{a.name}")
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/continual_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit, machine = git_commit(), machine_name()

    def write_all() -> None:
        rows = collect(runs, methods, orders, seeds)
        write_csv(results / f"continual_{a.name}.csv", rows, commit, machine)
        write_markdown(results / f"continual_{a.name}.md", rows, methods, orders, command.strip(), commit, machine)
        write_figure(results / f"continual_{a.name}.png", rows, methods)

    todo = [(m, o, s) for o in orders for s in seeds for m in methods
            if not finished(run_dir(runs, m, o, s), len(task_order(o)), m)]
    print(f"{len(todo)} runs to do ({len(methods) * len(orders) * len(seeds) - len(todo)} already finished), "
          f"{a.jobs} at a time; run folders in {runs}", flush=True)
    failures = []
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {pool.submit(run_one, m, o, s, runs, a.set, a.config): (m, o, s) for m, o, s in todo}
        for fut in as_completed(futures):
            m, o, s = futures[fut]
            try:
                _, minutes = fut.result()
                print(f"done: {m} {o} seed {s} ({minutes:.1f} min)", flush=True)
            except RuntimeError as exc:
                failures.append(str(exc))
                print(f"FAILED: {exc}", flush=True)
            write_all()
    write_all()
    print(f"results: {results / f'continual_{a.name}.md'}")
    if failures:
        raise SystemExit("some runs failed:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
