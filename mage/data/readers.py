"""Readers of the Continual-NExT release layout (SPEC section 7; `mage.data.mini` documents the folders).

Every record becomes a `Record`: a list of (instruction, answer) turns plus the input image and the
target image paths. Conversation tasks keep every turn (each answer is supervised); text-to-image
turns ["Please generate the image.", caption] into one instruction "Please generate the image. caption"
(as SEED-X does) with the image as target; editing takes its source as input and target as output.
`preflight` checks every record and image before training and raises one `DataError` listing what to fix.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from mage.data.tasks import TASK_NAMES, TaskSpec, get_task
from mage.data.vocab import GENERATE_INSTRUCTION

MAX_LISTED = 5  # problems / missing files listed per task in an error message


class DataError(ValueError):
    """The data on disk does not match the release layout; the message says what to fix."""


@dataclass
class Record:
    task: str
    example_id: str
    turns: list[tuple[str, str]]       # (instruction, answer); answer "" when the answer is an image
    image: Path | None = None           # input image
    target_image: Path | None = None    # output image (generation target / edited image)
    answer: str | None = None           # reference answer of a test record (text tasks)
    meta: dict = field(default_factory=dict)  # test: question_id (+ refcoco: size, answer_bbox)


def _task_dir(spec: TaskSpec, root: str | Path) -> Path:
    return Path(root) / spec.dir_name


def _annotation_files(spec: TaskSpec, root: str | Path) -> list[Path]:
    return sorted((_task_dir(spec, root) / "annotations").glob("*.jsonl"))


def _need(rec: dict, keys: tuple[str, ...], where: str) -> str | None:
    if not isinstance(rec, dict):
        return f"{where}: expected a JSON object, got {type(rec).__name__}"
    missing = [k for k in keys if k not in rec]
    return f"{where}: missing key(s) {missing} (has {sorted(rec)})" if missing else None


def _train_record(spec: TaskSpec, rec: dict, image_dir: Path, example_id: str, where: str) -> Record | str:
    """A Record, or a string describing what is wrong with the line."""
    if spec.record_kind == "edit":
        problem = _need(rec, ("source_image", "target_image", "instruction"), where)
        if problem:
            return problem
        return Record(spec.name, example_id, [(str(rec["instruction"]), "")],
                      image=image_dir / rec["source_image"], target_image=image_dir / rec["target_image"])
    problem = _need(rec, ("image", "data"), where)
    if problem:
        return problem
    data = rec["data"]
    if not isinstance(data, list) or len(data) < 2 or len(data) % 2 or not all(isinstance(t, str) for t in data):
        return f"{where}: 'data' must be a list of strings [question, answer, ...] of even length >= 2, got {data!r:.120}"
    if spec.record_kind == "generation":
        return Record(spec.name, example_id, [(" ".join(data[:2]), "")], target_image=image_dir / rec["image"])
    turns = [(data[i], data[i + 1]) for i in range(0, len(data), 2)]
    return Record(spec.name, example_id, turns, image=image_dir / rec["image"])


def _read_train(spec: TaskSpec, root: str | Path) -> tuple[list[Record], list[str]]:
    files = _annotation_files(spec, root)
    if not files:
        return [], [f"no training annotations: expected {_task_dir(spec, root) / 'annotations'}/*.jsonl"]
    image_dir = _task_dir(spec, root) / spec.train_image_dir
    records, problems = [], []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
                    continue
                out = _train_record(spec, rec, image_dir, f"{spec.name}/{path.stem}:{line_no}", where)
                (problems if isinstance(out, str) else records).append(out)
    if not records and not problems:
        problems.append(f"no training records in {', '.join(map(str, files))}")
    return records, problems


def _test_record(spec: TaskSpec, rec: dict, image_dir: Path, where: str) -> Record | str:
    if spec.record_kind == "edit":
        problem = _need(rec, ("question_id", "source_image", "target_image", "instruction"), where)
        if problem:
            return problem
        return Record(spec.name, f"{spec.name}/{rec['question_id']}", [(str(rec["instruction"]), "")],
                      image=image_dir / rec["source_image"], target_image=image_dir / rec["target_image"])
    if spec.record_kind == "generation":
        problem = _need(rec, ("question_id", "text"), where)
        if problem:
            return problem
        target = image_dir / rec["image"] if rec.get("image") else None  # the release has captions only
        return Record(spec.name, f"{spec.name}/{rec['question_id']}", [(f"{GENERATE_INSTRUCTION} {rec['text']}", "")],
                      target_image=target, answer=str(rec["text"]))
    keys = ("question_id", "image", "text", "answer") + (("answer_bbox",) if spec.scorer == "box_iou" else ())
    problem = _need(rec, keys, where)
    if problem:
        return problem
    meta = {k: rec[k] for k in ("size", "answer_bbox") if k in rec}
    answer = str(rec["answer_bbox"] if spec.scorer == "box_iou" else rec["answer"])
    return Record(spec.name, f"{spec.name}/{rec['question_id']}", [(str(rec["text"]), answer)],
                  image=image_dir / rec["image"], answer=answer, meta=meta)


def _read_test(spec: TaskSpec, root: str | Path) -> tuple[list[Record], list[str]]:
    path = _task_dir(spec, root) / "questions" / "test.json"
    if not path.is_file():
        return [], [f"no test set: expected {path}"]
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        return [], [f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"]
    if not isinstance(data, list) or not data:
        return [], [f"{path}: expected a non-empty JSON list of test records"]
    image_dir = _task_dir(spec, root) / spec.test_image_dir
    records, problems = [], []
    for i, rec in enumerate(data):
        out = _test_record(spec, rec, image_dir, f"{path}[{i}]")
        if isinstance(out, str):
            problems.append(out)
        else:
            out.meta["question_id"] = rec["question_id"]
            records.append(out)
    return records, problems


def _fail(task: str, problems: list[str]) -> DataError:
    listed = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return DataError(f"task {task}: {len(problems)} bad record(s):\n  {listed}{more}\n"
                     f"Fix or remove these lines (run mage.data.readers.preflight for a full check).")


def load_train_records(task: str, root: str | Path) -> list[Record]:
    """All training records of a task (every annotations/*.jsonl file, in name order)."""
    spec = get_task(task)
    records, problems = _read_train(spec, root)
    if problems:
        raise _fail(spec.name, problems)
    return records


def load_test_records(task: str, root: str | Path) -> list[Record]:
    """The test records of a task (questions/test.json)."""
    spec = get_task(task)
    records, problems = _read_test(spec, root)
    if problems:
        raise _fail(spec.name, problems)
    return records


def _image_paths(records: list[Record]) -> list[Path]:
    return [p for r in records for p in (r.image, r.target_image) if p is not None]


def preflight(tasks: list[str] | tuple[str, ...], root: str | Path, check_test: bool = True) -> dict[str, dict[str, int]]:
    """Check every record and image file of `tasks` under `root` before training.

    Returns {task: {"train": n, "test": m}} when all is well; otherwise raises one DataError that lists,
    per task, malformed lines (file:line), missing keys and the number of missing image files (the
    first few named).
    """
    report: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    if not Path(root).is_dir():
        raise DataError(f"data root {str(root)!r} does not exist; point the data root at the Continual-NExT "
                        f"folder, or generate the mini benchmark: python -m mage.data.mini --out {root}")
    for task in tasks:
        spec = get_task(task)
        train, problems = _read_train(spec, root)
        test: list[Record] = []
        if check_test:
            test, test_problems = _read_test(spec, root)
            problems += test_problems
        missing = [p for p in _image_paths(train + test) if not p.is_file()]
        counts[spec.name] = {"train": len(train), "test": len(test)}
        lines = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            lines.append(f"... and {len(problems) - MAX_LISTED} more bad record(s)")
        if missing:
            named = ", ".join(str(p) for p in missing[:MAX_LISTED])
            lines.append(f"{len(missing)} missing image file(s), e.g. {named}")
        if lines:
            report.append(f"{spec.name} ({spec.dir_name}):\n    " + "\n    ".join(lines))
    if report:
        raise DataError(f"data check under {root} failed:\n  " + "\n  ".join(report) +
                        "\nFix the listed annotation lines (valid JSON with the release's keys, SPEC section 7) "
                        "and put the missing images where the records point, or regenerate the mini "
                        "benchmark with python -m mage.data.mini.")
    return counts


def main(argv: list[str] | None = None) -> None:
    """`python -m mage.data.readers --root DIR [--tasks ...]`: run the preflight check and print the counts."""
    p = argparse.ArgumentParser(prog="python -m mage.data.readers", description="check a Continual-NExT data root")
    p.add_argument("--root", required=True)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    a = p.parse_args(argv)
    try:
        counts = preflight(a.tasks, a.root)
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    for task, n in counts.items():
        print(f"{task:10s} train {n['train']:7d}  test {n['test']:6d}")


if __name__ == "__main__":
    main()
