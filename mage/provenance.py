"""Where a result came from: the git commit of the checkout that produced it (benchmarks, runs)."""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit(root: Path = REPO) -> str:
    """Short HEAD hash, with "+dirty" when the tree has uncommitted changes; "none" outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "none"
    return (head or "none") + ("+dirty" if dirty else "")


def append_csv_rows(path: str | Path, fieldnames: list[str], rows: list[dict]) -> None:
    """Append result rows to a CSV kept in the repo, writing the header when the file is new.

    When the rows bring columns the file lacks (a benchmark that measures more than it used to), the file is
    rewritten once with the old header followed by the new columns; earlier rows keep their values and
    leave the new columns empty.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, old_rows = list(reader.fieldnames or []), list(reader)
        added = [k for k in fieldnames if k not in header]
        if added:
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header + added)
                writer.writeheader()
                writer.writerows(old_rows)
            tmp.replace(path)
            header += added
        fieldnames = header
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
