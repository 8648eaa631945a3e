"""Checkpoints that survive crashes: tensors in safetensors, the rest in a torch sidecar.

Layout in ``RUN/checkpoints``: ``TAG.safetensors`` (trainable weights, method state such as EMA and
Fisher), ``TAG.state.pt`` (optimizer, scheduler, RNG states, data position, matrix so far, resolved
config) and ``latest.json`` naming the newest pair. TAG is ``task{k}_end`` after task k (all kept) or
``task{k}_step{s}`` mid-task (only the newest kept). Every file is written to a temporary name, fsynced
and renamed over its target, and ``latest.json`` is replaced last, so a crash or a full disk at any
point leaves the previous checkpoint in force.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message says what to do."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(f, data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """tmp file + fsync + os.replace: ``path`` holds either its old content or ``data``, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_durably(f, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def serialize_state(state: dict[str, Any]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(ckpt_dir: Path, tag: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write one checkpoint and point ``latest.json`` at it; returns the tensor file's path."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensor_path, state_path = ckpt_dir / f"{tag}.safetensors", ckpt_dir / f"{tag}.state.pt"
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    previous = read_latest(ckpt_dir)
    try:
        write_bytes_atomic(tensor_path, save(cpu))
        write_bytes_atomic(state_path, serialize_state(state))
        write_bytes_atomic(ckpt_dir / LATEST, json.dumps({"tag": tag, "tensors": tensor_path.name,
                                             "state": state_path.name}).encode())
    except OSError as e:
        still = f"the previous checkpoint {previous['tag']!r} is intact" if previous else "no earlier checkpoint exists"
        hint = ("the disk is full: free space" if e.errno == errno.ENOSPC else f"the write failed ({e.strerror or e})")
        raise CheckpointError(f"could not write checkpoint {tag!r} in {ckpt_dir}: {hint}; {still}. "
                              "Re-run the same command to resume from it.") from e
    return tensor_path


def read_latest(ckpt_dir: Path) -> dict[str, str] | None:
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of the newest checkpoint, or None when there is none."""
    latest = read_latest(ckpt_dir)
    if latest is None:
        return None
    tensors = load_file(ckpt_dir / latest["tensors"])
    state = torch.load(ckpt_dir / latest["state"], map_location="cpu", weights_only=True)
    return tensors, state


def prune_mid_task(ckpt_dir: Path, keep_tag: str) -> None:
    """Remove mid-task checkpoints other than ``keep_tag`` (task-end ones, tagged ``*_end``, stay)."""
    for path in ckpt_dir.glob("task*_step*.*"):
        tag = path.name.split(".")[0]
        if tag != keep_tag and not tag.endswith("_end"):
            path.unlink(missing_ok=True)
