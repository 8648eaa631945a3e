"""What a finished (or partial) run leaves for the user: accuracy matrix (JSON, PNG) and metrics (Markdown)."""
from __future__ import annotations

import json
from pathlib import Path

from mage.eval.metrics import continual_metrics

METRIC_ROWS = (
    ("avg_acc", "Avg.ACC"), ("forgetting", "Forgetting (paper form)"), ("forgetting_max", "Forgetting (max form)"),
    ("new_acc", "New.ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("avg_hal", "Avg.HAL"), ("avg_iuf", "Avg.IUF"),
    ("avg_oth", "Avg.OTH"),
)


def format_matrix(tasks: list[str], rows: list[list[float]], zero_shot: list[float] | None,
                  row_labels: list[str] | None = None) -> str:
    """Fixed-width text table: one row per evaluation point, one column per task (rows labelled by the task
    trained last unless ``row_labels`` names them, e.g. one joint-training row)."""
    width = max(9, *(len(t) + 1 for t in tasks))
    labelled = ([("zero-shot", zero_shot)] if zero_shot is not None else []) + \
               [(row_labels[j] if row_labels else f"{j + 1}:{tasks[j]}", r) for j, r in enumerate(rows)]
    first = max(14, *(len(label) + 1 for label, _ in labelled)) if labelled else 14
    lines = [f"{'after':<{first}}" + "".join(f"{t:>{width}}" for t in tasks)]
    for label, r in labelled:
        lines.append(f"{label:<{first}}" + "".join(f"{v:>{width}.2f}" for v in r))
    return "\n".join(lines)


def compute_metrics(rows: list[list[float]], zero_shot: list[float] | None,
                    error_labels: dict[tuple[int, int], list[str]] | None = None) -> dict:
    """continual_metrics over the rows so far (the square part: tasks trained up to now)."""
    t = len(rows)
    square = [r[:t] for r in rows]
    zero = zero_shot[:t] if zero_shot is not None else None
    return continual_metrics(square, zero_shot_row=zero, error_labels=error_labels)


def format_metrics(metrics: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}"

    return "\n".join(f"{label:<24} {fmt(metrics.get(key))}" for key, label in METRIC_ROWS)


def write_reports(run_dir: Path, tasks: list[str], rows: list[list[float]], zero_shot: list[float] | None,
                  metrics: dict, scorers: dict[str, str] | None = None, row_labels: list[str] | None = None) -> None:
    """`scorers`: task -> what its score is (e.g. "feature-cosine stand-in (not CLIP)"), written with the numbers;
    `row_labels`: names of the matrix rows when they are not "after task j" (joint, zero_shot)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "accuracy_matrix.json").write_text(json.dumps(
        {"tasks": tasks, "zero_shot": zero_shot, "matrix": rows, "scorers": scorers,
         "note": "matrix[j][i] = score on task i after training task j (0-based); zero_shot = before training",
         **({"row_labels": row_labels} if row_labels else {})},
        indent=2) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    lines = ["# Continual-learning metrics", "", f"Tasks: {', '.join(tasks)} ({len(rows)} trained)", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {'n/a' if metrics.get(key) is None else f'{metrics[key]:.2f}'} |"
              for key, label in METRIC_ROWS]
    lines += ["", "Forgetting (paper form) = mean_i (A[i][i] - A[T][i]); max form uses max_j A[j][i].", "",
              "## Accuracy matrix", "", "```", format_matrix(tasks, rows, zero_shot, row_labels), "```", ""]
    if scorers:
        lines += ["## Scores", ""] + [f"- {t}: {scorers[t]}" for t in tasks if t in scorers] + [""]
    (run_dir / "metrics.md").write_text("\n".join(lines))
    _heatmap(run_dir / "accuracy_matrix.png", tasks, rows, zero_shot, row_labels)


def _heatmap(path: Path, tasks: list[str], rows: list[list[float]], zero_shot: list[float] | None,
             row_labels: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = ([zero_shot] if zero_shot is not None else []) + rows
    labels = (["zero-shot"] if zero_shot is not None else []) + \
        (list(row_labels) if row_labels else [f"after {t}" for t in tasks[:len(rows)]])
    fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2, 0.6 * len(data) + 1.5))
    im = ax.imshow(data, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for j, r in enumerate(data):
        for i, v in enumerate(r):
            ax.text(i, j, f"{v:.1f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="score")
    ax.set_title("score on task (column) after training (row)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
