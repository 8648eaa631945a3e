"""Calibrate EWC's lambda: a sweep of method.ewc_lambda on the mini preset with a training seed kept out of
the result tables (default 7; benchmarks/continual_table.py uses seeds 1, 2, 3).

Per lambda it trains the first ``--tasks`` tasks with ``method.name=ewc`` and records, besides Avg.ACC,
Forgetting and New.ACC, how strong the penalty is: on every optimizer step after task 1, the norm of the
penalty's gradient lambda F (theta - theta*) (exact: the penalty is quadratic) against the norm of the task
loss' gradient (the step's gradient minus the penalty's), both over all LoRA parameters; the table reports
the median over steps of their ratio. EWC only does something when that ratio is of order 1; far below it,
EWC trains like plain LoRA. Rows go to benchmarks/results/ewc_lambda.csv.

    python benchmarks/ewc_lambda_sweep.py                                   # lambdas 5e3 .. 5e7, 3 tasks, the preset's steps
    python benchmarks/ewc_lambda_sweep.py --lambdas 1e6,1e7 --tasks 2 --steps 20 --set eval.max_examples=8
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mage, not an installed one

from mage.provenance import append_csv_rows, git_commit  # noqa: E402
from mage.trainer.config import load_config  # noqa: E402
from mage.trainer.data import resolve_tasks  # noqa: E402
from mage.trainer.distributed import DistInfo  # noqa: E402
from mage.trainer.loop import SequenceTrainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ewc_lambda.csv"
FIELDS = ["date", "commit", "host", "seed", "tasks", "steps_per_task", "ewc_lambda", "penalty_to_task_grad_median",
          "penalty_to_task_grad_p90", "avg_acc", "forgetting", "new_acc", "seconds"]


def measure_gradient_ratio(trainer: SequenceTrainer) -> list[float]:
    """Wraps the EWC method's ``before_clip`` to record ||grad penalty|| / ||grad task|| per step (host sync per
    step: a calibration run, not training)."""
    method, ratios = trainer.method, []
    real = method.before_clip

    def before_clip(grad_of):
        if method.fisher:
            with torch.no_grad():
                pen = task = 0.0
                for n, p in method.named:
                    g = grad_of(p)
                    if g is None:
                        continue
                    gp = method.cfg.ewc_lambda * method.fisher[n] * (p.detach().float() - method.anchor[n])
                    pen += float(gp.square().sum())
                    task += float((g.float() - gp).square().sum())
                ratios.append((pen / max(task, 1e-300)) ** 0.5)
        real(grad_of)

    method.before_clip = before_clip
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lambdas", default="5e3,5e4,5e5,5e6,5e7")
    ap.add_argument("--seed", type=int, default=7, help="train.seed; keep it out of the result tables' seeds")
    ap.add_argument("--tasks", type=int, default=3, help="the first N tasks of the default order")
    ap.add_argument("--steps", type=int, default=0, help="train.steps_per_task (0: the preset's)")
    ap.add_argument("--config", default="mini")
    ap.add_argument("--set", action="append", default=[], help="extra SECTION.FIELD=VALUE overrides")
    ap.add_argument("--out-root", default="runs/ewc_sweep")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    rows = []
    for lam in [float(x) for x in args.lambdas.split(",")]:
        overrides = {"method.name": "ewc", "method.ewc_lambda": lam, "train.seed": args.seed,
                     "run.out_dir": f"{args.out_root}/seed{args.seed}_lambda{lam:g}", "run.progress": False,
                     "run.tensorboard": False, "train.device": "cpu"}
        base = load_config(args.config)
        overrides["data.tasks"] = ",".join(t.name for t in resolve_tasks(base.data)[:args.tasks])
        if args.steps:
            overrides["train.steps_per_task"] = args.steps
        for kv in args.set:
            k, _, v = kv.partition("=")
            overrides[k] = v
        cfg = load_config(args.config, overrides)
        trainer = SequenceTrainer(cfg, info)
        ratios = measure_gradient_ratio(trainer)
        start = time.perf_counter()
        result = trainer.run()
        seconds = time.perf_counter() - start
        m = result["metrics"]
        qs = sorted(ratios)
        row = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": git_commit(), "host": platform.node(), "seed": args.seed, "tasks": overrides["data.tasks"],
               "steps_per_task": cfg.train.steps_per_task, "ewc_lambda": lam,
               "penalty_to_task_grad_median": statistics.median(qs) if qs else None,
               "penalty_to_task_grad_p90": qs[int(0.9 * (len(qs) - 1))] if qs else None,
               "avg_acc": m.get("avg_acc"), "forgetting": m.get("forgetting"), "new_acc": m.get("new_acc"),
               "seconds": round(seconds, 1)}
        rows.append(row)
        print({k: row[k] for k in FIELDS[5:]}, flush=True)
    if not args.no_csv:
        append_csv_rows(RESULTS, FIELDS, rows)


if __name__ == "__main__":
    main()
