"""Readers of the Continual-NExT release as it is (docs/METHOD.md section 7; `mage.data.mini` writes the same layout).

Every record becomes a `Record`: a list of (instruction, answer) turns plus the input image and the
target image paths. Conversation tasks keep every turn (each answer is supervised); text-to-image
turns ["Please generate the image.", caption] into one instruction "Please generate the image. caption"
(as SEED-X does) with the image as target; editing takes its source as input and target as output.

What the official loader and evaluation do, and so do these readers:
- training annotations are every `annotations/**/*.jsonl` (recursive, in path order);
- a training record whose image is null, '' or 'none' (or holds 'null') is skipped, not an error;
- a leading '/' of an image path is stripped; a path that would leave the image folder ('..') is an
  error, so a record can never point outside the data root;
- HQEdit training pairs whose source image has a side < 400 px or an aspect ratio outside
  [0.6, 1/0.6] are dropped when `ReaderOptions.edit_filter` is on (the seed-x-13b preset; off on mini,
  whose images are small);
- test keys: VQAv2 / ImageNet / OCRVQA {question_id, image, text, answer}; RefCOCO {question_id, size,
  image, text, origin_answer_bbox, answer_bbox} (no answer: the reference is answer_bbox); Flickr30k
  {text} (the caption; question_id and image optional); HQEdit {source_image, target_image,
  instruction} (question_id optional);
- the task folder may carry the release's name (SEED-Data-VQAv2, ...), the MAGE README's spelling
  (SEED-Data-Fliackr30k) or the short name (VQAv2, Flickr30k, Grounding, ...).

`preflight` checks every record and image before training and raises one `DataError` naming every
problem with file:line and what was expected; `python -m mage.data.readers --root DIR` prints them all.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mage.data.tasks import TASK_NAMES, TaskSpec, get_task
from mage.data.vocab import GENERATE_INSTRUCTION

MAX_LISTED = 5  # problems / missing files listed per task in an exception message (the CLI lists all)
EDIT_MIN_SIDE = 400       # official HQEdit filter: both sides of the source image >= 400 px
EDIT_MIN_ASPECT = 0.6     # and height / width within [0.6, 1 / 0.6]
# Other names the release and the MAGE README give the task folders (the first existing one is used).
DIR_ALIASES = {
    "vqav2": ("VQAv2",),
    "imagenet": ("ImageNet",),
    "flickr30k": ("SEED-Data-Fliackr30k", "Flickr30k"),
    "ocrvqa": ("OCRVQA", "OCR-VQA"),
    "refcoco": ("Grounding", "RefCOCO"),
    "hqedit": ("HQEdit",),
}
# Instructions a Flickr30k test text may already start with (then it is used as the prompt as is).
GENERATION_PREFIXES = ("please generate", "generate an image")


class DataError(ValueError):
    """The data on disk does not match the release layout; the message says what to fix."""


@dataclass(frozen=True)
class ReaderOptions:
    """Choices between the official loader's behaviour and the mini benchmark's (defaults: mini)."""
    edit_filter: bool = False   # drop HQEdit training pairs outside the official size / aspect filter
    # Prompt of a Flickr30k test record whose text is the caption only; the official evaluation uses
    # "Generate an image: {caption}", training uses the record's own "Please generate the image. {caption}".
    generation_prompt: str = GENERATE_INSTRUCTION + " {caption}"

    def __post_init__(self) -> None:
        if "{caption}" not in self.generation_prompt:
            raise ValueError(f"generation_prompt {self.generation_prompt!r} must contain '{{caption}}'")


@dataclass
class Record:
    task: str
    example_id: str
    turns: list[tuple[str, str]]       # (instruction, answer); answer "" when the answer is an image
    image: Path | None = None           # input image
    target_image: Path | None = None    # output image (generation target / edited image)
    answer: str | None = None           # reference of a test record (text answer, box, or Flickr30k caption)
    meta: dict = field(default_factory=dict)  # test: question_id (+ refcoco: size, answer_bbox, origin_answer_bbox)
    source: str = ""                    # file:line the record was read from


@dataclass
class _Read:
    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0     # records without an image (official skip)
    filtered: int = 0    # HQEdit pairs dropped by the size / aspect filter


def task_dir(spec: TaskSpec, root: str | Path) -> Path:
    """The task's folder under root: the release's name or one of its aliases (the first that exists)."""
    root = Path(root)
    for name in (spec.dir_name, *DIR_ALIASES.get(spec.name, ())):
        if (root / name).is_dir():
            return root / name
    return root / spec.dir_name


def _annotation_files(spec: TaskSpec, root: str | Path) -> list[Path]:
    return sorted((task_dir(spec, root) / "annotations").rglob("*.jsonl"))


def _no_image(value) -> bool:
    """The official skip rule: image null, '' or 'none' (or a string holding 'null')."""
    return value is None or (isinstance(value, str) and (value.strip() in ("", "none") or "null" in value))


def image_path(base: Path, rel, where: str, key: str) -> Path | str:
    """base / rel with a leading '/' stripped; a problem string if rel is not a path inside base."""
    if not isinstance(rel, str) or not rel.strip():
        return f"{where}: '{key}' must be a relative image path, got {rel!r}"
    joined = os.path.normpath(os.path.join(base, rel.strip().lstrip("/")))
    if os.path.commonpath([joined, os.path.normpath(base)]) != os.path.normpath(base):
        return f"{where}: '{key}' {rel!r} leaves the image folder {base}; image paths must stay inside it"
    return Path(joined)


def _need(rec, keys: tuple[str, ...], where: str) -> str | None:
    if not isinstance(rec, dict):
        return f"{where}: expected a JSON object, got {type(rec).__name__}"
    missing = [k for k in keys if k not in rec]
    return f"{where}: missing key(s) {missing} (has {sorted(rec)})" if missing else None


def _edit_size_ok(path: Path) -> bool:
    from PIL import Image
    with Image.open(path) as im:  # reads the header only
        width, height = im.size
    aspect = height / width
    return min(width, height) >= EDIT_MIN_SIDE and EDIT_MIN_ASPECT <= aspect <= 1 / EDIT_MIN_ASPECT


def _train_record(spec: TaskSpec, rec: dict, image_dir: Path, example_id: str, where: str, out: _Read,
                  options: ReaderOptions) -> None:
    if spec.record_kind == "edit":
        problem = _need(rec, ("source_image", "target_image", "instruction"), where)
        if problem:
            out.problems.append(problem)
            return
        src = image_path(image_dir, rec["source_image"], where, "source_image")
        tgt = image_path(image_dir, rec["target_image"], where, "target_image")
        bad = [p for p in (src, tgt) if isinstance(p, str)]
        if bad:
            out.problems.extend(bad)
            return
        if options.edit_filter and src.is_file() and not _edit_size_ok(src):
            out.filtered += 1
            return
        out.records.append(Record(spec.name, example_id, [(str(rec["instruction"]), "")], image=src, target_image=tgt,
                                  source=where))
        return
    problem = _need(rec, ("data",), where)
    if problem:
        out.problems.append(problem)
        return
    if _no_image(rec.get("image")):
        out.skipped += 1
        return
    data = rec["data"]
    if not isinstance(data, list) or len(data) < 2 or len(data) % 2 or not all(isinstance(t, str) for t in data):
        out.problems.append(f"{where}: 'data' must be a list of strings [question, answer, ...] of even length "
                            f">= 2, got {data!r:.120}")
        return
    path = image_path(image_dir, rec["image"], where, "image")
    if isinstance(path, str):
        out.problems.append(path)
    elif spec.record_kind == "generation":
        out.records.append(Record(spec.name, example_id, [(" ".join(data[:2]), "")], target_image=path, source=where))
    else:
        turns = [(data[i], data[i + 1]) for i in range(0, len(data), 2)]
        out.records.append(Record(spec.name, example_id, turns, image=path, source=where))


def _read_train(spec: TaskSpec, root: str | Path, options: ReaderOptions) -> _Read:
    out = _Read()
    files = _annotation_files(spec, root)
    if not files:
        out.problems.append(f"no training annotations: expected {task_dir(spec, root) / 'annotations'}/**/*.jsonl")
        return out
    image_dir = task_dir(spec, root) / spec.train_image_dir
    annotations = task_dir(spec, root) / "annotations"
    for path in files:
        stem = path.relative_to(annotations).with_suffix("").as_posix()
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    out.problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
                    continue
                _train_record(spec, rec, image_dir, f"{spec.name}/{stem}:{line_no}", where, out, options)
    if not out.records and not out.problems:
        out.problems.append(f"no usable training records in {', '.join(map(str, files))} "
                            f"({out.skipped} without image, {out.filtered} filtered)")
    return out


def _json_list_with_lines(text: str, path: Path) -> list[tuple[int, object]] | str:
    """(line, element) of a top-level JSON list, or a problem string naming file:line."""
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip(0)
    if pos >= len(text) or text[pos] != "[":
        return f"{path}:{line_of(pos)}: expected a JSON list of test records"
    pos, items = skip(pos + 1), []
    if pos < len(text) and text[pos] == "]":
        return items
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            return f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
        items.append((line_of(pos), value))
        pos = skip(end)
        if pos < len(text) and text[pos] == "]":
            return items
        if pos >= len(text) or text[pos] != ",":
            return f"{path}:{line_of(pos)}: expected ',' or ']' after a test record"
        pos = skip(pos + 1)


def _test_record(spec: TaskSpec, rec: dict, image_dir: Path, index: int, where: str, options: ReaderOptions) -> Record | str:
    if spec.record_kind == "edit":
        problem = _need(rec, ("source_image", "target_image", "instruction"), where)
        if problem:
            return problem
        src = image_path(image_dir, rec["source_image"], where, "source_image")
        tgt = image_path(image_dir, rec["target_image"], where, "target_image")
        for p in (src, tgt):
            if isinstance(p, str):
                return p
        qid = rec.get("question_id", index)
        return Record(spec.name, f"{spec.name}/{qid}", [(str(rec["instruction"]), "")], image=src, target_image=tgt,
                      meta={"question_id": qid})
    if spec.record_kind == "generation":
        problem = _need(rec, ("text",), where)
        if problem:
            return problem
        text = str(rec["text"]).strip()
        if not text:
            return f"{where}: 'text' (the caption) is empty"
        target = None
        if not _no_image(rec.get("image")):  # the release has captions only; mini adds the reference image
            target = image_path(image_dir, rec["image"], where, "image")
            if isinstance(target, str):
                return target
        prompt = text if text.lower().startswith(GENERATION_PREFIXES) else options.generation_prompt.format(caption=text)
        qid = rec.get("question_id", index)
        return Record(spec.name, f"{spec.name}/{qid}", [(prompt, "")], target_image=target, answer=text,
                      meta={"question_id": qid})
    box = spec.scorer == "box_iou"
    keys = ("question_id", "image", "text") + (("answer_bbox",) if box else ("answer",))
    problem = _need(rec, keys, where)
    if problem:
        return problem
    path = image_path(image_dir, rec["image"], where, "image")
    if isinstance(path, str):
        return path
    meta = {k: rec[k] for k in ("question_id", "size", "answer_bbox", "origin_answer_bbox") if k in rec}
    answer = rec["answer_bbox"] if box else rec["answer"]
    if box and isinstance(answer, (list, tuple)):  # a box as a JSON list: the text form the model writes
        answer = "[" + ",".join(f"{float(v):.2f}" for v in answer) + "]"
    answer = str(answer)
    return Record(spec.name, f"{spec.name}/{rec['question_id']}", [(str(rec["text"]), answer)],
                  image=path, answer=answer, meta=meta)


def _read_test(spec: TaskSpec, root: str | Path, options: ReaderOptions) -> _Read:
    out = _Read()
    path = task_dir(spec, root) / "questions" / "test.json"
    if not path.is_file():
        out.problems.append(f"no test set: expected {path}")
        return out
    items = _json_list_with_lines(path.read_text(encoding="utf-8"), path)
    if isinstance(items, str):
        out.problems.append(items)
        return out
    if not items:
        out.problems.append(f"{path}: expected a non-empty JSON list of test records")
    image_dir = task_dir(spec, root) / spec.test_image_dir
    for index, (line, rec) in enumerate(items):
        rec_or_problem = _test_record(spec, rec, image_dir, index, f"{path}:{line}", options)
        if isinstance(rec_or_problem, Record):
            rec_or_problem.source = f"{path}:{line}"
        (out.problems if isinstance(rec_or_problem, str) else out.records).append(rec_or_problem)
    return out


def _fail(task: str, problems: list[str]) -> DataError:
    listed = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return DataError(f"task {task}: {len(problems)} bad record(s):\n  {listed}{more}\n"
                     f"Fix or remove these lines (python -m mage.data.readers --root DIR lists every problem).")


def load_train_records(task: str, root: str | Path, options: ReaderOptions | None = None) -> list[Record]:
    """All usable training records of a task (every annotations/**/*.jsonl file, in path order)."""
    spec = get_task(task)
    out = _read_train(spec, root, options or ReaderOptions())
    if out.problems:
        raise _fail(spec.name, out.problems)
    return out.records


def load_test_records(task: str, root: str | Path, options: ReaderOptions | None = None) -> list[Record]:
    """The test records of a task (questions/test.json)."""
    spec = get_task(task)
    out = _read_test(spec, root, options or ReaderOptions())
    if out.problems:
        raise _fail(spec.name, out.problems)
    return out.records


def _missing_images(records: list[Record]) -> list[tuple[str, Path]]:
    """(file:line of the record, path) of every image a record names that is not a file."""
    return [(r.source, p) for r in records for p in (r.image, r.target_image) if p is not None and not p.is_file()]


def preflight(tasks: list[str] | tuple[str, ...], root: str | Path, check_test: bool = True,
              options: ReaderOptions | None = None, max_listed: int | None = MAX_LISTED,
              details: bool = False) -> dict[str, dict[str, int]]:
    """Check every record and image file of `tasks` under `root` before training.

    Returns {task: {"train": n, "test": m}} when all is well (with `details`, also "skipped": records
    without an image, "filtered": HQEdit pairs dropped by the size filter); otherwise
    raises one DataError that lists, per task, malformed lines (file:line and what was expected) and
    the missing image files (`max_listed` of each per task; None = all).
    """
    options = options or ReaderOptions()
    report: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    if not Path(root).is_dir():
        raise DataError(f"data root {str(root)!r} does not exist; point the data root at the Continual-NExT "
                        f"folder, or generate the mini benchmark: python -m mage.data.mini --out {root}")
    for task in tasks:
        spec = get_task(task)
        train = _read_train(spec, root, options)
        test = _read_test(spec, root, options) if check_test else _Read()
        problems = train.problems + test.problems
        missing = _missing_images(train.records + test.records)
        counts[spec.name] = {"train": len(train.records), "test": len(test.records)}
        if details:
            counts[spec.name].update(skipped=train.skipped, filtered=train.filtered)
        limit = len(problems) if max_listed is None else max_listed
        lines = problems[:limit]
        if len(problems) > limit:
            lines.append(f"... and {len(problems) - limit} more bad record(s)")
        if missing:
            limit = len(missing) if max_listed is None else max_listed
            lines.append(f"{len(missing)} missing image file(s):")
            lines += [f"  {where}: image {path} does not exist" for where, path in missing[:limit]]
            if len(missing) > limit:
                lines.append(f"  ... and {len(missing) - limit} more")
        if lines:
            report.append(f"{spec.name} ({task_dir(spec, root).name}):\n    " + "\n    ".join(lines))
    if report:
        raise DataError(f"data check under {root} failed:\n  " + "\n  ".join(report) +
                        "\nFix the listed annotation lines (valid JSON with the release's keys, docs/REAL_DATA.md) "
                        "and put the missing images where the records point, or regenerate the mini "
                        "benchmark with python -m mage.data.mini.")
    return counts


def main(argv: list[str] | None = None) -> None:
    """`python -m mage.data.readers --root DIR [--tasks ...]`: check a data root, list every problem."""
    p = argparse.ArgumentParser(prog="python -m mage.data.readers", description="check a Continual-NExT data root")
    p.add_argument("--root", required=True)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    p.add_argument("--edit-filter", action="store_true", help="apply the official HQEdit size/aspect filter")
    a = p.parse_args(argv)
    try:
        counts = preflight(a.tasks, a.root, options=ReaderOptions(edit_filter=a.edit_filter), max_listed=None,
                           details=True)
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    for task, n in counts.items():
        print(f"{task:10s} train {n['train']:7d}  test {n['test']:6d}  skipped (no image) {n['skipped']:5d}  "
              f"filtered {n['filtered']:5d}")


if __name__ == "__main__":
    main()
