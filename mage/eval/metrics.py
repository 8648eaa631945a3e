"""Continual-learning metrics over an accuracy matrix (docs/METHOD.md section 6).

``matrix[j][i]`` (0-based here) is the score on task i after training task j. Rows are either
lower-triangular (row j holds tasks 0..j) or full (every task after every task, which also gives the
forward transfer when the zero-shot row is known).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

ERROR_TYPES = ("IUF", "HAL", "OTH")
LABELS = ("correct",) + ERROR_TYPES


def _check_matrix(matrix: Sequence[Sequence[float]]) -> tuple[list[list[float]], bool]:
    rows = [list(r) for r in matrix]
    T = len(rows)
    if T == 0:
        raise ValueError("accuracy matrix is empty: it needs one row per trained task")
    lengths = [len(r) for r in rows]
    full = all(n == T for n in lengths)
    if not full and lengths != list(range(1, T + 1)):
        raise ValueError(f"accuracy matrix rows have lengths {lengths}; expected a lower-triangular matrix "
                         f"(lengths 1..{T}) or a full {T}x{T} matrix (one row per trained task)")
    for j, r in enumerate(rows):
        for i, v in enumerate(r):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"accuracy matrix entry [{j}][{i}] = {v!r} is not a finite number")
    return rows, full


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def error_type_forgetting(labels_final: Sequence[Sequence[str]],
                          labels_after_own: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """Avg.X (Eqs. 8-10), in percent: the share of task i's examples that are errors of type X after the
    last task but were not errors of type X right after task i, averaged over tasks i < T.

    ``labels_final[i]`` and ``labels_after_own[i]`` are per-example labels (one of LABELS) for EVERY
    earlier task i < T (docs/METHOD.md section 6: image tasks included, labelled by ``image_error_labels``), after
    the last task and after task i itself.
    """
    if len(labels_final) != len(labels_after_own):
        raise ValueError(f"error labels: {len(labels_final)} tasks after the last task but "
                         f"{len(labels_after_own)} right after their own task")
    out: dict[str, float | None] = {}
    for x in ERROR_TYPES:
        rates = []
        for i, (final, own) in enumerate(zip(labels_final, labels_after_own)):
            if len(final) != len(own) or not final:
                raise ValueError(f"error labels of task {i}: {len(final)} examples after the last task, "
                                 f"{len(own)} after its own task; both must label the same non-empty test set")
            for lab in (*final, *own):
                if lab not in LABELS:
                    raise ValueError(f"unknown error label {lab!r} for task {i}; expected one of {LABELS}")
            new_errors = sum(1 for a, b in zip(final, own) if a == x and b != x)
            rates.append(100.0 * new_errors / len(final))
        out[f"avg_{x.lower()}"] = _mean(rates)
    return out


def continual_metrics(matrix: Sequence[Sequence[float]], zero_shot_row: Sequence[float] | None = None,
                      error_labels: Mapping[tuple[int, int], Sequence[str]] | None = None) -> dict:
    """Avg.ACC, Forgetting (paper form and max form), New.ACC, BWT, FWT and the error-type forgetting.

    ``error_labels[(j, i)]``: per-example labels of task i after task j (0-based), needed for
    j = i and j = T-1 for every i < T-1. Metrics over an empty set of tasks (T = 1) are None.
    """
    rows, full = _check_matrix(matrix)
    T = len(rows)
    last = rows[-1]
    earlier = range(T - 1)
    result: dict = {
        "num_tasks": T,
        "avg_acc": _mean(last),
        "new_acc": _mean([rows[i][i] for i in range(T)]),
        # The paper's tables: drop from the score right after learning the task.
        "forgetting": _mean([rows[i][i] - last[i] for i in earlier]),
        "forgetting_max": _mean([max(rows[j][i] for j in range(i, T - 1)) - last[i] for i in earlier]),
        "bwt": _mean([last[i] - rows[i][i] for i in earlier]),
        "fwt": None,
    }
    if zero_shot_row is not None:
        zero = list(zero_shot_row)
        _check_matrix([zero] * len(zero))  # same finiteness checks
        if len(zero) != T:
            raise ValueError(f"zero-shot row has {len(zero)} scores but the matrix has {T} tasks")
        if not full:
            raise ValueError("FWT needs the scores of tasks not yet trained: pass the full TxT matrix")
        result["fwt"] = _mean([rows[i - 1][i] - zero[i] for i in range(1, T)])
    if error_labels is not None:
        try:
            final = [error_labels[(T - 1, i)] for i in earlier]
            own = [error_labels[(i, i)] for i in earlier]
        except KeyError as e:
            raise ValueError(f"error labels missing for (after task, task) = {e.args[0]}") from None
        result.update(error_type_forgetting(final, own))
    return result


def single_phase_metrics(row: Sequence[float]) -> dict:
    """Metrics of a run with one evaluation row: joint training (one phase on all tasks) or zero-shot (none).

    Avg.ACC is the row's mean, and so is New.ACC (each task's score right after the phase that trained it
    is that row); Forgetting, BWT, FWT and the error types need several rows and are None.
    """
    rows, _ = _check_matrix([list(row)] * len(row))
    return {"num_tasks": len(row), "avg_acc": _mean(rows[0]), "new_acc": _mean(rows[0]), "forgetting": None,
            "forgetting_max": None, "bwt": None, "fwt": None, "avg_iuf": None, "avg_hal": None, "avg_oth": None}
