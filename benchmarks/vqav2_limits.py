"""What keeps VQAv2 below the learnability bar: plain LoRA on VQAv2 alone, by lr and by objects per scene.

    python benchmarks/vqav2_limits.py                                   # objects 3,2,1 x lr 3e-4,1e-3,3e-3, seeds 1-3
    python benchmarks/vqav2_limits.py --objects 3 --lrs 3e-4 --seeds 1

Each (objects, lr, seed) is one `python train.py --method.name lora --data.tasks vqav2` run of the mini preset's
steps from the committed base, on VQAv2 written with `python -m mage.data.mini --vqa-max-objects K` (3 is the
benchmark; 2 and 1 are easier scenes, and with one object "How many" is always "1", so they are a study,
never the benchmark). After training, the test set is answered again and scored per question form (colour,
shape, count, yes/no, where), which tells a format not yet learned (a colour answering "Is there ...?") from
a perception limit (right format, chance accuracy). Runs are kept under --runs-dir and never redone;
benchmarks/results/<name>.{csv,md} are rewritten as runs finish.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from answers_by_question import answer_task, load_tensors_, open_run  # noqa: E402
from continual_table import machine_name, mean_std, run_all, run_train  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tasks_alone import scores  # noqa: E402

from mage.data import mini  # noqa: E402
from mage.provenance import git_commit  # noqa: E402

# Question form of a VQAv2 test question, by how it starts (vocab.VQA_QUESTIONS).
FORMS = {"color": "What color", "shape": "What shape", "count": "How many", "exists": "Is there", "where": "Where is"}
COLUMNS = ("objects", "lr", "seed", "zero_shot", "trained", *(f"form_{f}" for f in FORMS), "commit", "machine")


def question_kind(question: str) -> str:
    return next(kind for kind, start in FORMS.items() if question.startswith(start))


def data_root(runs: Path, objects: int) -> Path:
    """VQAv2 alone with 1..objects objects per scene, written once (seed 0, the benchmark's sizes)."""
    root = runs / f"data-objects{objects}"
    if not (root / "done").is_file():
        mini.generate(root, tasks=["vqav2"], vqa_max_objects=objects)
        (root / "done").write_text("")
    return root


def run_folder(runs: Path, objects: int, lr: str, seed: int) -> Path:
    return runs / f"objects{objects}" / f"lr{lr}" / f"seed{seed}"


def train_one(runs: Path, objects: int, lr: str, seed: int, sets: list[str]) -> float:
    folder = run_folder(runs, objects, lr, seed)
    args = ["--method.name", "lora", "--data.tasks", "vqav2", "--data.root", str(data_root(runs, objects)),
            "--data.generate_mini", "false", "--optim.lr", lr, "--train.seed", str(seed),
            "--run.out_dir", str(folder), "--run.progress", "false", "--run.tensorboard", "false"]
    for s in sets:
        args += ["--set", s]
    return run_train(args, folder, f"vqav2 objects {objects} lr {lr} seed {seed}")


def by_form(folder: Path) -> dict[str, float]:
    """Accuracy per question form after training (cached in FOLDER/forms.json)."""
    cache = folder / "forms.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    with open_run(folder) as (trainer, info):
        load_tensors_(trainer, load_file(str(folder / "checkpoints" / "task01_end.safetensors")))
        _, records, _, correct, _ = answer_task(trainer, info, "vqav2", 24)
    right = {f: [0, 0] for f in FORMS}
    for rec, ok in zip(records, correct):
        tally = right[question_kind(rec.turns[0][0])]
        tally[0] += bool(ok)
        tally[1] += 1
    forms = {f: 100 * r / n for f, (r, n) in right.items() if n}
    cache.write_text(json.dumps(forms))
    return forms


def row(folder: Path, objects: int, lr: str, seed: int, commit: str, machine: str) -> dict | None:
    got = scores(folder)
    if got is None:
        return None
    forms = by_form(folder)
    return {"objects": objects, "lr": lr, "seed": seed, "zero_shot": got[0], "trained": got[1],
            **{f"form_{f}": forms.get(f) for f in FORMS}, "commit": commit, "machine": machine}


def write_results(out: Path, rows: list[dict], command: str, commit: str, machine: str) -> None:
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["# VQAv2 alone (plain LoRA): by lr and objects per scene", "", f"Command: `{command}`  ",
             f"Commit: {commit}; machine: {machine}. Objects 3 is the benchmark; 2 and 1 are easier scenes "
             "(a study, not the benchmark). Per form: accuracy on the test questions of that form, mean over seeds.",
             "", "| objects | lr | seeds | zero-shot | after training | " + " | ".join(FORMS) + " |",
             "|---|---|---|---|---|" + "---|" * len(FORMS)]
    for key in dict.fromkeys((r["objects"], r["lr"]) for r in rows):
        group = [r for r in rows if (r["objects"], r["lr"]) == key]
        forms = " | ".join(f"{statistics.mean(r[f'form_{f}'] for r in group):.1f}" for f in FORMS)
        lines.append(f"| {key[0]} | {key[1]} | {','.join(str(r['seed']) for r in group)} | "
                     f"{mean_std([r['zero_shot'] for r in group])} | {mean_std([r['trained'] for r in group])} | "
                     f"{forms} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", default="3,2,1", help="max objects per VQAv2 scene, comma-separated")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="learning rates, comma-separated")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="runs at once (one thread each)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--name", default="vqav2_limits", help="results are benchmarks/results/<name>.{csv,md}")
    p.add_argument("--runs-dir", default=None, help="run folders and data (default runs/<name>)")
    a = p.parse_args(argv)
    grid = [(int(k), lr, int(s)) for k in a.objects.split(",") for lr in a.lrs.split(",") for s in a.seeds.split(",")]
    runs = Path(a.runs_dir or REPO / "runs" / a.name)
    out = REPO / "benchmarks" / "results" / a.name
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/vqav2_limits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit, machine = git_commit(), machine_name()  # before any result file exists (else "+dirty")
    for k in dict.fromkeys(k for k, _, _ in grid):
        data_root(runs, k)  # before the workers start: two runs never write the same data
    todo = [g for g in grid if scores(run_folder(runs, *g)) is None]
    print(f"{len(todo)} runs to do ({len(grid) - len(todo)} already finished), {a.jobs} at a time", flush=True)

    def write() -> None:
        rows = [r for g in grid if (r := row(run_folder(runs, *g), *g, commit, machine)) is not None]
        write_results(out, rows, command.strip(), commit, machine)

    run_all(todo, a.jobs, lambda *g: train_one(runs, *g, a.set), lambda g: f"objects {g[0]} lr {g[1]} seed {g[2]}",
            write, out.with_suffix(".md"))


if __name__ == "__main__":
    main()
