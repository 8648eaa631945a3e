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
    """Append result rows to a CSV kept in the repo, writing the header when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        if new:
            writer.writeheader()
        writer.writerows(rows)
