"""Continual-NExT-mini: a procedurally drawn, seed-deterministic stand-in for the six Continual-NExT tasks.

    python -m mage.data.mini --out DIR --seed N [--train-per-task K --test-per-task M --image-size S]
                              [--vqa-max-objects 1|2|3]

writes, in the real release's layout (MAGE README and configs; docs/METHOD.md section 7), with PNG images:

    DIR/
      SEED-Data-VQAv2/      COCO2014/train2014/*.png  COCO2014/val2014/*.png  annotations/train.jsonl  questions/test.json
      SEED-Data-ImageNet/   imagenet/train/*.png      imagenet/val/*.png      annotations/train.jsonl  questions/test.json
      SEED-Data-Flickr30k/  images/*.png                                      annotations/train.jsonl  questions/test.json
      SEED-Data-OCRVQA/     OCR-VQA/images/*.png                              annotations/train.jsonl  questions/test.json
      SEED-Data-Grounding/  COCO2014/train2014/*.png  COCO2014/val2014/*.png  annotations/train.jsonl  questions/test.json
      SEED-Data-HQEdit/     images/source_images/*.png  images/target_images/*.png  annotations/train.jsonl  questions/test.json

Training records (JSONL; image paths relative to the task's training image folder, see `TaskSpec`):
  vqav2, imagenet, ocrvqa, refcoco: {"image": ..., "data": [q1, a1, q2, a2, ...]} (VQA has two turns)
  flickr30k: {"image": ..., "data": ["Please generate the image.", caption]} (image = target)
  hqedit: {"source_image": "source_images/..", "target_image": "target_images/..", "instruction": ...}
Test records (one JSON list; image paths relative to the task's test image folder):
  {"question_id", "image", "text", "answer"}; refcoco adds "size" [w, h] and "answer_bbox" (the box
  string); flickr30k {"question_id", "text", "image"} (the image is the reference target; the release
  has only the caption); hqedit {"question_id", "source_image", "target_image", "instruction"}.

Tasks (one closed vocabulary, `mage.data.vocab`; shared words and question forms on purpose, see there):
  vqav2      1-3 shapes of distinct shape and colour on a 3x3 layout: colour / shape / count / yes-no /
             where ("top left", ...) questions
  imagenet   one large object of ten classes (ring, cross, star, ...) in its class colour: the class name
  flickr30k  caption "a red circle in the top left" -> the image of that shape
  ocrvqa     1 (or, one time in four, 2) large seven-segment digits in one colour: "What is written in the
             image?" -> "47", or (one time in four) "What color is the text?" -> "red"
  refcoco    1-2 shapes of one size on the 3x3 layout: the box of the named one, "[x1,y1,x2,y2]" normalised
             to 0..1 with 2 decimals; asked as "Please provide the box of ..." or, one time in three, with
             VQAv2's "Where is the red circle?" (same input, other answer: the tasks interfere)
  hqedit     one shape + "make the circle blue" / "turn the circle into a square" / "move the circle to
             the top left" -> the edited image
Each task draws from its own `random.Random(f"{seed}-{task}")`: the same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from mage.data import vocab
from mage.data.draw import canvas, draw_class, draw_digit, draw_shape
from mage.data.tasks import TASK_NAMES, get_task

DEFAULT_TRAIN_PER_TASK = 600
DEFAULT_TEST_PER_TASK = 200
DEFAULT_IMAGE_SIZE = 112
# 1-3 objects per VQAv2 scene; fewer (--vqa-max-objects) is a study of what limits VQAv2 (docs/RESULTS.md),
# not the benchmark: with one object "How many" is always "1".
DEFAULT_VQA_MAX_OBJECTS = 3
# Where test images go inside the test image folder (the release keeps COCO val2014 etc. apart).
TEST_SUBDIR = {"vqav2": "val2014", "imagenet": "val", "refcoco": "val2014"}

Images = dict[str, Image.Image]  # path relative to the task folder -> image
_COLORS = tuple(vocab.COLORS)
_POSITIONS = tuple(vocab.POSITIONS)


def _scene(rng: random.Random, size: int, k: int, r_range: tuple[int, int],
           jitter: int) -> list[tuple[str, str, int, int, int]]:
    """k objects of distinct shapes and colours in distinct cells of a 3x3 layout: (shape, colour, cx, cy, r).

    Objects never overlap: r + jitter stays inside half a cell.
    """
    cells = rng.sample(range(9), k)
    shapes = rng.sample(vocab.SHAPES, k)
    colors = rng.sample(_COLORS, k)
    cell = size / 3
    objs = []
    for c, s, col in zip(cells, shapes, colors):
        r = rng.randint(*r_range)
        cx = round(cell * (c % 3 + 0.5)) + rng.randint(-jitter, jitter)
        cy = round(cell * (c // 3 + 0.5)) + rng.randint(-jitter, jitter)
        objs.append((s, col, cx, cy, r))
    return objs


def cell_name(cx: int, cy: int, size: int) -> str:
    """The name of the 3x3-layout cell that holds the point (cx, cy)."""
    col, row = min(2, max(0, cx * 3 // size)), min(2, max(0, cy * 3 // size))
    return vocab.CELL_NAMES[row * 3 + col]


def render_objects(objs, size: int) -> Image.Image:
    img, d = canvas(size)
    for s, col, cx, cy, r in objs:
        draw_shape(d, s, col, cx, cy, r)
    return img


def _vqa_turn(rng: random.Random, objs, kind: str, size: int) -> tuple[str, str]:
    s, col = rng.choice(objs)[:2]
    q = vocab.VQA_QUESTIONS[kind]
    if kind == "color":
        return q.format(shape=s), col
    if kind == "shape":
        return q.format(color=col), s
    if kind == "count":
        return q, str(len(objs))
    if kind == "where":
        _, _, cx, cy, _ = next(o for o in objs if o[0] == s)
        return q.format(color=col, shape=s), cell_name(cx, cy, size)
    if rng.random() < 0.5:
        return q.format(article=vocab.article(col), color=col, shape=s), "yes"
    sh, c = absent_shape_color(rng, objs)
    return q.format(article=vocab.article(c), color=c, shape=sh), "no"


def absent_shape_color(rng: random.Random, objs) -> tuple[str, str]:
    """A (shape, colour) pair that no object of the scene has: what a "no" to "Is there ...?" asks about."""
    present = {(o[0], o[1]) for o in objs}
    return rng.choice([(sh, c) for sh in vocab.SHAPES for c in _COLORS if (sh, c) not in present])


def random_scene(rng: random.Random, size: int, k: int | None = None) -> list[tuple[str, str, int, int, int]]:
    """k (default 1-3) shapes of distinct shape and colour on the 3x3 layout (VQAv2's scenes, and the pretraining's)."""
    return _scene(rng, size, rng.randint(1, 3) if k is None else k, (size // 9, size // 7), size // 48)


def draw_object(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """One large drawing of an ImageNet-stand-in class in its colour, about the centre: (image, class)."""
    cls = rng.choice(vocab.CLASSES)
    img, d = canvas(size)
    c, j = size // 2, size // 16
    draw_class(d, cls, vocab.CLASS_COLORS[cls], c + rng.randint(-j, j), c + rng.randint(-j, j),
               rng.randint(size * 3 // 10, size // 3), rng)
    return img, cls


def _vqav2(rng: random.Random, size: int, turns: int,
           max_objects: int = DEFAULT_VQA_MAX_OBJECTS) -> tuple[list[str], Image.Image, dict]:
    objs = random_scene(rng, size, rng.randint(1, max_objects))
    data: list[str] = []
    for kind in rng.sample(tuple(vocab.VQA_QUESTIONS), turns):
        data += _vqa_turn(rng, objs, kind, size)
    return data, render_objects(objs, size), {}


def _imagenet(rng: random.Random, size: int, turns: int):
    img, cls = draw_object(rng, size)
    return [vocab.CLASSIFY_QUESTION, cls], img, {}


def draw_number(rng: random.Random, size: int, text: str, color: str) -> Image.Image:
    """Large seven-segment digits about the centre: readable through a 4x4 grid of image tokens."""
    h = rng.randint(size // 2, size * 3 // 5)
    w, t = h // 2, max(3, h // 8)
    gap = t + 2
    total = len(text) * w + (len(text) - 1) * gap
    j = size // 24
    x = (size - total) // 2 + rng.randint(-j, j)
    y = (size - h) // 2 + rng.randint(-j, j)
    img, d = canvas(size)
    for i, ch in enumerate(text):
        draw_digit(d, ch, x + i * (w + gap), y, w, h, t, vocab.COLORS[color])
    return img


def random_number(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(1 if rng.random() < 0.75 else 2))


def _ocrvqa(rng: random.Random, size: int, turns: int):
    text, color = random_number(rng), rng.choice(_COLORS)
    img = draw_number(rng, size, text, color)
    if rng.random() < 0.25:
        return [vocab.OCR_COLOR_QUESTION, color], img, {}
    return [vocab.OCR_QUESTION, text], img, {}


def format_box(box: tuple[float, float, float, float]) -> str:
    """A normalised box as the release writes it: "[0.27,0.42,0.83,0.73]"."""
    return "[" + ",".join(f"{v:.2f}" for v in box) + "]"


def object_box(cx: int, cy: int, r: int, size: int) -> str:
    """The box of a shape of half-size r centred at (cx, cy), normalised to the image and clamped to 0..1."""
    return format_box(tuple(min(1.0, max(0.0, v / size)) for v in (cx - r, cy - r, cx + r, cy + r)))


def _refcoco(rng: random.Random, size: int, turns: int):
    objs = _scene(rng, size, rng.randint(1, 2), (size // 8, size // 8), 0)  # one size, no jitter: 9 boxes
    s, col, cx, cy, r = rng.choice(objs)
    box = object_box(cx, cy, r, size)
    template = vocab.GROUNDING_WHERE_QUESTION if rng.random() < 1 / 3 else vocab.GROUNDING_QUESTION
    q = template.format(color=col, shape=s)
    return [q, box], render_objects(objs, size), {"size": [size, size], "answer_bbox": box}


def position_xy(rng: random.Random, size: int, pos: str) -> tuple[int, int]:
    fx, fy = vocab.POSITIONS[pos]
    j = size // 36
    return round(fx * size) + rng.randint(-j, j), round(fy * size) + rng.randint(-j, j)


def _flickr30k(rng: random.Random, size: int, turns: int):
    s, col, pos = rng.choice(vocab.SHAPES), rng.choice(_COLORS), rng.choice(_POSITIONS)
    cx, cy = position_xy(rng, size, pos)
    img = render_objects([(s, col, cx, cy, size // 7 + rng.randint(-2, 2))], size)
    caption = vocab.CAPTION.format(article=vocab.article(col), color=col, shape=s, position=pos)
    return [vocab.GENERATE_INSTRUCTION, caption], img, {}


def _hqedit(rng: random.Random, size: int) -> tuple[str, Image.Image, Image.Image]:
    s, col, pos = rng.choice(vocab.SHAPES), rng.choice(_COLORS), rng.choice(_POSITIONS)
    r = size // 7 + rng.randint(-2, 2)
    cx, cy = position_xy(rng, size, pos)
    source = render_objects([(s, col, cx, cy, r)], size)
    kind = rng.choice(tuple(vocab.EDIT_INSTRUCTIONS))
    template = vocab.EDIT_INSTRUCTIONS[kind]
    if kind == "recolor":
        new = rng.choice([c for c in _COLORS if c != col])
        instruction, target = template.format(shape=s, color=new), (s, new, cx, cy, r)
    elif kind == "reshape":
        new = rng.choice([x for x in vocab.SHAPES if x != s])
        instruction, target = template.format(shape=s, shape2=new), (new, col, cx, cy, r)
    else:
        new = rng.choice([p for p in _POSITIONS if p != pos])
        instruction, target = template.format(shape=s, position=new), (s, col, *position_xy(rng, size, new), r)
    return instruction, source, render_objects([target], size)


_CONVERSATION_TASKS: dict[str, Callable] = {"vqav2": _vqav2, "imagenet": _imagenet, "ocrvqa": _ocrvqa,
                                            "refcoco": _refcoco, "flickr30k": _flickr30k}


def _write_task(task: str, root: Path, seed: int, n_train: int, n_test: int, size: int,
                vqa_max_objects: int = DEFAULT_VQA_MAX_OBJECTS) -> None:
    spec = get_task(task)
    make = _CONVERSATION_TASKS.get(task)
    if task == "vqav2":
        make = functools.partial(_vqav2, max_objects=vqa_max_objects)
    rng = random.Random(f"{seed}-{task}")
    tdir = root / spec.dir_name
    train_records: list[dict] = []
    test_records: list[dict] = []
    images: Images = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            name = f"mini_{split}_{i:06d}.png"
            if task == "hqedit":
                instruction, src, tgt = _hqedit(rng, size)
                rec = {"source_image": f"source_images/{name}", "target_image": f"target_images/{name}",
                       "instruction": instruction}
                images[f"{spec.train_image_dir}/source_images/{name}"] = src
                images[f"{spec.train_image_dir}/target_images/{name}"] = tgt
                if split == "train":
                    train_records.append(rec)
                else:
                    test_records.append({"question_id": i, **rec})
                continue
            data, img, extra = make(rng, size, 2 if split == "train" else 1)
            if split == "train":
                images[f"{spec.train_image_dir}/{name}"] = img
                train_records.append({"image": name, "data": data})
                continue
            sub = TEST_SUBDIR.get(task, "")
            rel = f"{sub}/{name}" if sub else name
            images[f"{spec.test_image_dir}/{rel}"] = img
            if task == "flickr30k":
                test_records.append({"question_id": i, "text": data[1], "image": rel})
            else:
                test_records.append({"question_id": i, "image": rel, "text": data[0], "answer": data[1], **extra})
    for rel, img in images.items():
        path = tdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
    (tdir / "annotations").mkdir(parents=True, exist_ok=True)
    (tdir / "questions").mkdir(parents=True, exist_ok=True)
    with open(tdir / "annotations" / "train.jsonl", "w", encoding="utf-8") as f:
        for rec in train_records:
            f.write(json.dumps(rec) + "\n")
    with open(tdir / "questions" / "test.json", "w", encoding="utf-8") as f:
        json.dump(test_records, f, indent=1)
        f.write("\n")


def generate(out: str | Path, seed: int = 0, train_per_task: int = DEFAULT_TRAIN_PER_TASK,
             test_per_task: int = DEFAULT_TEST_PER_TASK, image_size: int = DEFAULT_IMAGE_SIZE,
             tasks: tuple[str, ...] | list[str] = TASK_NAMES,
             vqa_max_objects: int = DEFAULT_VQA_MAX_OBJECTS) -> Path:
    """Write Continual-NExT-mini under `out` (see the module docstring); returns the root."""
    if train_per_task < 1 or test_per_task < 1:
        raise ValueError(f"train_per_task={train_per_task}, test_per_task={test_per_task}: both must be >= 1")
    if not 1 <= vqa_max_objects <= 3:
        raise ValueError(f"vqa_max_objects={vqa_max_objects}: a VQAv2 scene holds 1 to 3 objects (colours and "
                         f"shapes are distinct within a scene); use 1, 2 or 3")
    if image_size < 48:
        raise ValueError(f"image_size={image_size} is too small for the drawings; use 48 or more")
    root = Path(out)
    for task in tasks:
        _write_task(get_task(task).name, root, seed, train_per_task, test_per_task, image_size, vqa_max_objects)
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mage.data.mini", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (the data root)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-task", type=int, default=DEFAULT_TRAIN_PER_TASK)
    p.add_argument("--test-per-task", type=int, default=DEFAULT_TEST_PER_TASK)
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), help="subset of tasks to write")
    p.add_argument("--vqa-max-objects", type=int, default=DEFAULT_VQA_MAX_OBJECTS,
                   help="objects per VQAv2 scene, 1 to this (default 3; fewer only to study VQAv2's limits)")
    a = p.parse_args(argv)
    root = generate(a.out, a.seed, a.train_per_task, a.test_per_task, a.image_size, a.tasks, a.vqa_max_objects)
    print(f"wrote Continual-NExT-mini ({len(a.tasks)} tasks, {a.train_per_task} train / {a.test_per_task} "
          f"test each, seed {a.seed}) to {root}")


if __name__ == "__main__":
    main()
