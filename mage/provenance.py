"""Where a result came from: the git commit of the checkout that produced it (benchmarks, runs)."""
from __future__ import annotations

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
