"""The continual-learning table on Continual-NExT-mini: methods x seeds (x task orders), mean +- std.

    python benchmarks/continual_table.py                                   # lora, ew_ga, mage in every PEMA mode, seeds 1-3
    python benchmarks/continual_table.py --methods lora,mage:fisher --seeds 1,2,3,4,5 --jobs 2
    python benchmarks/continual_table.py --methods mage --orders default,reverse,alphabetical
    python benchmarks/continual_table.py --set optim.lr=1e-3 --name lr1e-3  # a variant, kept apart
    python benchmarks/continual_table.py --preset paper --name paper       # the paper's Table 1 methods
    python benchmarks/continual_table.py --preset orders --name orders     # mage in the three task orders
    python benchmarks/continual_table.py --preset paper --seeds 1 --jobs 2 # a preset; --methods/--orders still win

Every (method, seed, order) is one `python train.py` run in its own folder under --runs-dir, started
with one thread (OMP_NUM_THREADS=1), --jobs at a time. A finished run is never redone; an interrupted
one resumes from its checkpoints when the command is run again. After each run the results are
rewritten from every finished run: benchmarks/results/continual_<name>.csv (one row per run: metrics,
the diagonal and the final row, zero-shot row, minutes, commit, machine), .md (mean +- std over seeds,
in the layouts of the paper's Tables 1, 2 (error types), 4 (ablations) and 5 (task orders), each written
when its rows are there) and .png (Avg.ACC per method, the final row per task).

A method is `NAME` or `NAME:PEMA_MODE` (for mage), e.g. `mage:fisher`.

    python benchmarks/continual_table.py --preset paper --seeds 1,2,3 --name paper \
        --with-rows benchmarks/results/continual_paper.csv   # seeds 1-2 from that CSV, seed 3 run here

--with-rows counts the rows of an earlier table's CSV (runs made on another machine, or whose folders are
gone) instead of running them; each keeps its own commit and machine in the CSV and the .md names them.
Their settings cannot be checked against this table's: the CSV holds no config, so use it only for rows of
the same commit's code. (Training is deterministic on CPU for a given thread count: a run repeated on
another machine and torch build gave the same accuracy matrix to the last digit, docs/RESULTS.md.)
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

# --preset: method and order lists of the paper's tables; an explicit --methods / --orders wins.
PRESETS = {
    "paper": {"methods": "zero_shot,joint,lora,ew,ew_ga,mage,moelora,lae,ewc,pgp,cia,reglora"},
    "orders": {"methods": "mage", "orders": "default,reverse,alphabetical"},
}
# Which method names (before any ":MODE") each paper table compares.
ERROR_TABLE_METHODS = ("lora", "moelora", "mage")
ABLATION_METHODS = ("ew", "ew_ga", "mage")
ERROR_METRICS = ("avg_hal", "avg_iuf", "avg_oth")
SUMMARY_METRICS = ("avg_acc", "forgetting", "new_acc")


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


def train_args(method: str, order: str, seed: int, folder: Path, sets: list[str], config: str) -> list[str]:
    """The train.py arguments of one run of the table."""
    name, extra = parse_method(method)
    args = ["--config", config, "--method.name", name, *extra, "--train.seed", str(seed), "--data.order", order,
            "--run.out_dir", str(folder), "--run.progress", "false", "--run.tensorboard", "false",
            "--run.checkpoint_every", "50"]
    for s in sets:
        args += ["--set", s]
    return args


def stale_settings(folder: Path, args: list[str]) -> list[str]:
    """How a finished run's saved config differs from the one these arguments give now (e.g. the preset's
    default PEMA mode changed since): such a run must not be counted as this table's."""
    from mage.trainer.config import config_differences, config_from_dict, load_config, parse_cli

    preset, overrides = parse_cli(args)
    saved = config_from_dict(json.loads((folder / "config.json").read_text()))
    return config_differences(saved.flat(), load_config(preset, overrides))


def run_train(args: list[str], folder: Path, what: str) -> float:
    """`python train.py ARGS` with one thread, logged to FOLDER/train.log (appended, so a resumed run keeps
    its history); returns the wall minutes, also written to FOLDER/wall_minutes.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    with open(folder / "train.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); see {folder / 'train.log'}")
    minutes = (time.time() - start) / 60
    (folder / "wall_minutes.txt").write_text(f"{minutes:.2f}\n")
    return minutes


def run_all(todo: list[tuple], jobs: int, run, label, write, results: Path) -> None:
    """`run(*item)` (wall minutes) for each item of TODO, JOBS at a time, each line printed as it ends;
    `write()` after every finished run (a cut-off table keeps what it measured) and once more at the end.
    A failed run does not stop the others; it is rerun next time, and the failures end the program."""
    failures = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run, *item): item for item in todo}
        for fut in as_completed(futures):
            try:
                print(f"done: {label(futures[fut])} ({fut.result():.1f} min)", flush=True)
            except RuntimeError as exc:
                failures.append(str(exc))
                print(f"FAILED: {exc}", flush=True)
            write()
    write()
    print(f"results: {results}")
    if failures:
        raise SystemExit("some runs failed:\n  " + "\n  ".join(failures))


def run_one(method: str, order: str, seed: int, runs: Path, sets: list[str], config: str) -> tuple[Path, float]:
    """One train.py run (resumed if it was interrupted); returns its folder and wall minutes."""
    folder = run_dir(runs, method, order, seed)
    return folder, run_train(train_args(method, order, seed, folder, sets, config), folder,
                             f"{method} {order} seed {seed}")


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


def rows_from_csv(path: Path) -> list[dict]:
    """The runs of an earlier table's CSV, as `collect` gives them, each with the commit and machine it was
    measured at: a table can count runs made on another machine or in a runs folder since deleted."""
    rows = []
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for key, value in raw.items():
                if key in ("method", "order", "tasks", "matrix", "commit", "machine"):
                    row[key] = value
                elif key == "seed":
                    row[key] = int(value)
                else:
                    row[key] = float(value) if value not in ("", None) else None
            rows.append(row)
    return rows


def merge_rows(local: list[dict], earlier: list[dict], methods: list[str], orders: list[str],
               seeds: list[int]) -> list[dict]:
    """This table's runs plus the earlier rows it asks for (method, order and seed in its lists) and has not
    run itself, in (method, order, seed) order."""
    have = {(r["method"], r["order"], r["seed"]) for r in local}
    wanted = [r for r in earlier if r["method"] in methods and r["order"] in orders and r["seed"] in seeds
              and (r["method"], r["order"], r["seed"]) not in have]
    key = {(m, o, s): i for i, (m, o, s) in enumerate((m, o, s) for m in methods for o in orders for s in seeds)}
    return sorted(local + wanted, key=lambda r: key[(r["method"], r["order"], r["seed"])])


def mean_std(values: list) -> str:
    # None (a metric a run does not define, e.g. joint's Forgetting) and "n/a" strings are skipped.
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
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


def table_head(columns: list[str]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def stats_row(cells: list[str], rs: list[dict], keys: tuple[str, ...]) -> str:
    """A Markdown row: the leading cells, then mean +- std over the runs `rs` of each metric in `keys`."""
    return "| " + " | ".join([*cells, *(mean_std([r.get(k) for r in rs]) for k in keys)]) + " |"


def seeds_of(rs: list[dict]) -> str:
    return ",".join(str(r["seed"]) for r in rs)


def runs_by_method(rows: list[dict], methods: list[str], order: str, names: tuple[str, ...] | None = None) -> dict:
    """method -> its finished runs in `order`, in the order of `methods`; only methods with runs (and, when
    `names` is given, only specs whose method name is one of them: "mage:fisher" counts as "mage")."""
    group = {m: [r for r in rows if r["method"] == m and r["order"] == order] for m in methods
             if names is None or parse_method(m)[0] in names}
    return {m: rs for m, rs in group.items() if rs}


def order_section(rows: list[dict], methods: list[str], order: str) -> list[str]:
    """Every method in one order: the metrics, then per task zero-shot / after its task / after the last task."""
    tasks = list(task_order(order))
    group = runs_by_method(rows, methods, order)
    if not group:
        return []
    title = "Table 1: every method, default order" if order == "default" else f"Order: {order}"
    lines = [f"## {title}", "", *table_head(["method", "seeds", *(METRIC_LABELS[k] for k in METRICS)])]
    lines += [stats_row([m, seeds_of(rs)], rs, METRICS) for m, rs in group.items()]
    lines += ["", "Per task (the paper's Table 1 layout): zero-shot, right after training the task (diagonal), and "
              "after the last task.", "", *table_head(["method", "row", *(TITLES[t] for t in tasks), "mean"])]
    for m, rs in group.items():
        for kind, label in (("zero", "zero-shot"), ("diag", "after its task"), ("final", "after the last task")):
            cells = [mean_std([r[f"{kind}_{t}"] for r in rs]) for t in tasks]
            means = [statistics.mean(r[f"{kind}_{t}"] for t in tasks) for r in rs
                     if all(r[f"{kind}_{t}"] is not None for t in tasks)]
            lines.append(f"| {m} | {label} | " + " | ".join(cells) + f" | {mean_std(means)} |")
    return lines + [""]


def error_section(rows: list[dict], methods: list[str]) -> list[str]:
    """Table 2: forgetting split by error type, for LoRA, MoELoRA and MAGE, default order."""
    group = runs_by_method(rows, methods, "default", ERROR_TABLE_METHODS)
    if not group:
        return []
    # The definition mage.eval.metrics.error_type_forgetting computes, with the labels of mage.eval.scorers.
    lines = ["## Table 2: error types of forgetting", "",
             "Avg.X is the share (%) of an earlier task's test examples (every task but the last) that are errors "
             "of type X after the last task but were not errors of type X right after their own task, averaged "
             "over those tasks. HAL: a well-formed wrong answer (for VQAv2 and ImageNet one of the test set's "
             "answers, for RefCOCO a valid box), or an image scoring below eval.image_label_threshold; IUF: an "
             "answer that does not follow the task's format (empty, too long, outside the answer set, an image "
             "token or a box in a text answer, an invalid box) or no image; OTH: an example that cannot be judged "
             "(an unparseable reference box, a non-finite image score). Default order.", "",
             *table_head(["method", "seeds", *(METRIC_LABELS[k] for k in ERROR_METRICS)])]
    lines += [stats_row([m, seeds_of(rs)], rs, ERROR_METRICS) for m, rs in group.items()]
    return lines + [""]


def ablation_section(rows: list[dict], methods: list[str]) -> list[str]:
    """Table 4: EW, EW+GA and MAGE, default order; written only when an ablation (ew or ew_ga) has runs."""
    group = runs_by_method(rows, methods, "default", ABLATION_METHODS)
    if not any(parse_method(m)[0] != "mage" for m in group):
        return []
    lines = ["## Table 4: ablations", "",
             "ew = MoELoRA's four rank-8 experts summed with equal weight instead of routed, all trained on every "
             "task (the same computation as lora, so its rows equal lora's); ew_ga = each task trains only the "
             "groups of its modalities (group assignment); mage = ew_ga + PEMA. Default order.", "",
             *table_head(["method", "seeds", *(METRIC_LABELS[k] for k in SUMMARY_METRICS)])]
    lines += [stats_row([m, seeds_of(rs)], rs, SUMMARY_METRICS) for m, rs in group.items()]
    return lines + [""]


def orders_section(rows: list[dict], methods: list[str], orders: list[str]) -> list[str]:
    """Table 5: every method with runs in more than one task order, one row per order."""
    per_method = {m: {o: rs for o in orders if (rs := runs_by_method(rows, [m], o).get(m))} for m in methods}
    per_method = {m: by_order for m, by_order in per_method.items() if len(by_order) > 1}
    if not per_method:
        return []
    lines = ["## Table 5: task orders", "",
             *table_head(["method", "order", "tasks", "seeds", *(METRIC_LABELS[k] for k in SUMMARY_METRICS)])]
    for m, by_order in per_method.items():
        for o, rs in by_order.items():
            sequence = " → ".join(TITLES[t] for t in task_order(o))
            lines.append(stats_row([m, o, sequence, seeds_of(rs)], rs, SUMMARY_METRICS))
    return lines + [""]


def write_markdown(path: Path, rows: list[dict], methods: list[str], orders: list[str], command: str,
                   commit: str, machine: str) -> None:
    lines = [f"# Continual-NExT-mini: {', '.join(methods)}", "",
             f"Command: `{command}`  ", f"Commit: {commit}; machine: {machine}; "
             f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "Scores in percent; mean ± std over the seeds listed (sample std). Image tasks (Flickr30k, HQEdit) use "
             "the tiny model's stand-in score (centred feature cosine x 100), not CLIP.", ""]
    earlier = {}
    for r in rows:
        if r.get("commit") and (r["commit"], r["machine"]) != (commit, machine):
            earlier.setdefault((r["commit"], r["machine"]), set()).add(r["seed"])
    for (other, where), seeds in earlier.items():
        label = "Seed" if len(seeds) == 1 else "Seeds"
        lines += [f"{label} {','.join(map(str, sorted(seeds)))} of some rows were measured earlier (--with-rows): "
                  f"commit {other}; machine: {where}. The CSV names each row's commit.", ""]
    for order in orders:
        lines += order_section(rows, methods, order)
    lines += error_section(rows, methods) + ablation_section(rows, methods) + orders_section(rows, methods, orders)
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


def resolve_lists(preset: str | None, methods: str | None, orders: str | None) -> tuple[list[str], list[str]]:
    """Method and order lists from --preset, --methods and --orders (an explicit flag beats the preset)."""
    chosen = PRESETS[preset] if preset else {}
    methods = methods or chosen.get("methods", DEFAULT_METHODS)
    orders = orders or chosen.get("orders", "default")
    return [m.strip() for m in methods.split(",") if m.strip()], [o.strip() for o in orders.split(",") if o.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=None, help=f"comma-separated (default {DEFAULT_METHODS}, or the preset's)")
    p.add_argument("--seeds", default="1,2,3", help="train.seed values (default 1,2,3)")
    p.add_argument("--orders", default=None, help="task orders: default, reverse, alphabetical (default: default, "
                   "or the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper: the paper's Table 1 methods; orders: mage in the three task orders")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="runs at once (one thread each)")
    p.add_argument("--config", default="mini", help="preset (default mini)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--name", default="mini", help="results are benchmarks/results/continual_<name>.{csv,md,png}")
    p.add_argument("--runs-dir", default=None, help="run folders (default runs/table-<name>)")
    p.add_argument("--with-rows", action="append", default=[], metavar="CSV",
                   help="count the finished runs of an earlier table's CSV (its rows keep their commit and machine) "
                        "for the methods, orders and seeds asked that have no run folder here")
    a = p.parse_args(argv)
    methods, orders = resolve_lists(a.preset, a.methods, a.orders)
    seeds = [int(s) for s in a.seeds.split(",")]
    runs = Path(a.runs_dir or REPO / "runs" / f"table-{a.name}")
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/continual_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit, machine = git_commit(), machine_name()

    earlier = [r for path in a.with_rows for r in rows_from_csv(Path(path))]

    def write_all() -> None:
        rows = merge_rows(collect(runs, methods, orders, seeds), earlier, methods, orders, seeds)
        write_csv(results / f"continual_{a.name}.csv", rows, commit, machine)
        write_markdown(results / f"continual_{a.name}.md", rows, methods, orders, command.strip(), commit, machine)
        write_figure(results / f"continual_{a.name}.png", rows, methods)

    counted = {(r["method"], r["order"], r["seed"]) for r in earlier}
    todo = [(m, o, s) for o in orders for s in seeds for m in methods
            if not finished(run_dir(runs, m, o, s), len(task_order(o)), m) and (m, o, s) not in counted]
    stale = []
    for m, o, s in ((m, o, s) for o in orders for s in seeds for m in methods
                    if finished(run_dir(runs, m, o, s), len(task_order(o)), m)):
        folder = run_dir(runs, m, o, s)
        diffs = stale_settings(folder, train_args(m, o, s, folder, a.set, a.config))
        if diffs:
            stale.append(f"{folder}: " + "; ".join(diffs))
    if stale:
        raise SystemExit("finished runs in " + str(runs) + " were made with other settings than this table's:\n  " +
                         "\n  ".join(stale) + "\nUse another --runs-dir, or delete those folders to rerun them.")
    print(f"{len(todo)} runs to do ({len(methods) * len(orders) * len(seeds) - len(todo)} already finished), "
          f"{a.jobs} at a time; run folders in {runs}", flush=True)
    run_all(todo, a.jobs, lambda m, o, s: run_one(m, o, s, runs, a.set, a.config)[1],
            lambda item: f"{item[0]} {item[1]} seed {item[2]}", write_all, results / f"continual_{a.name}.md")


if __name__ == "__main__":
    main()
