"""The pretraining mixture of the tiny base model: general skills on the mini world, none of the six tasks.

A real MLLM comes to continual learning already able to see, read, count, locate, describe and draw.
This mixture gives the tiny SEED-X such skills with prompts that are NOT the Continual-NExT-mini task
prompts (`mage.data.vocab` PRETRAIN_*): the tasks then build on them, as the paper's tasks build on
SEED-X's pretraining. Examples are drawn in memory (no files) from one `random.Random(seed)`.

| skill | prompts (one drawn per example; `vocab.PRETRAIN_PROMPTS`) | answer |
|---|---|---|
| describe | "Describe the image." (a scene, or an ImageNet-style drawing) | "a red circle at the top left and ...", "a cyan ring" |
| count | "Count the shapes.", "How many shapes are there?", ... | "2" |
| locate | "Which part of the picture is the red circle in?", "Find the red circle.", ... | "top left" |
| name | "Name the red thing.", "Which shape is red?", ... | "circle" |
| color | "Which color is the circle?", "Name the color of the circle." | "red" |
| classify | "Which object is this?", "Name the object." | "star" |
| read | "Read the digits.", "Which number is shown?", ... | "47" |
| point | "Give the center of the red circle.", "Point to the red circle." | "[0.17,0.50]" |
| draw (text -> image) | "Draw a red circle at the top left.", "Paint ..." | the image |
| copy (image -> image) | "Copy the picture.", "Repeat the picture." | the same image |
| verify | "Does the picture show a red circle?", "Can you see a red circle?" | "yes" / "no" |
| corners | "Give the corners of the red circle.", "Outline the red circle." | "[0.05,0.36,0.28,0.64]" |
| remove (image -> image) | "Remove the red circle.", "Take away the red circle." | the scene without it |
| add (image -> image) | "Add a red circle at the top left.", "Put ... in the picture." | the scene with it |

verify, corners, remove and add give the base the answer formats a real MLLM brings to the tasks (yes/no,
a box, an image changed by an instruction) in other words and compositions than the tasks': without
them the base has never written "yes" or a box, and the first task that needs one (VQAv2's "Is there
...?", RefCOCO) must build the format from nothing, a large change that its LoRA applies to every prompt.

Every word of every task prompt ("Is", "Where", "objects", "written", "provide", ...) is also a word of
some pretraining prompt, in another sentence: the continual phase freezes the token embeddings, so a
word the base never read would keep its random init, and the base could not tell what a question
starting with it asks (tests/test_pretrain.py checks the vocabulary).
"""
from __future__ import annotations

import random

from mage.data import vocab
from mage.data.collate import Example
from mage.data.images import ImageConfig, image_views, target_view
from mage.data.mini import (absent_shape_color, cell_name, draw_number, draw_object, object_box, position_xy,
                            random_number, random_scene, render_objects)

SKILLS = ("describe", "describe_object", "count", "locate", "name", "color", "classify", "read", "point", "draw",
          "copy", "verify", "corners", "remove", "add")
IMAGE_SKILLS = ("draw", "copy", "remove", "add")  # answered with an image
# Text skills dominate, as in an MLLM's pretraining; draw, copy, remove and add train the image output path.
SKILL_WEIGHTS = (2, 1, 1, 3, 1, 1, 1, 4, 3, 3, 1, 2, 2, 1, 1)


def describe_scene(objs, size: int) -> str:
    """The describe skill's answer: every object with its cell, in reading order ("a red circle at the top left and ...")."""
    objs = sorted(objs, key=lambda o: vocab.CELL_NAMES.index(cell_name(o[2], o[3], size)))
    parts = [vocab.PRETRAIN_DESCRIBE_OBJECT.format(article=vocab.article(c), color=c, shape=s,
                                                   position=cell_name(x, y, size)) for s, c, x, y, _ in objs]
    return " and ".join(parts)


def _prompt(rng: random.Random, skill: str, **fields) -> str:
    prompt = rng.choice(vocab.PRETRAIN_PROMPTS[skill]).format(**fields)
    if skill not in IMAGE_SKILLS and rng.random() < 1 / 3:
        prompt += " " + rng.choice(vocab.PRETRAIN_SUFFIXES)
    return prompt


def draw_skill(rng: random.Random, skill: str, size: int):
    """(instruction, answer text, input image or None, target image or None) of one example."""
    if skill in ("describe_object", "classify"):
        img, cls = draw_object(rng, size)
        color = vocab.CLASS_COLORS[cls]
        if skill == "classify":
            return _prompt(rng, "classify"), cls, img, None
        return _prompt(rng, "describe"), vocab.PRETRAIN_DESCRIBE_CLASS.format(
            article=vocab.article(color), color=color, cls=cls), img, None
    if skill == "read":
        text = random_number(rng)
        return _prompt(rng, "read"), text, draw_number(rng, size, text, rng.choice(tuple(vocab.COLORS))), None
    if skill == "draw":
        s, col, pos = rng.choice(vocab.SHAPES), rng.choice(tuple(vocab.COLORS)), rng.choice(vocab.CELL_NAMES)
        cx, cy = position_xy(rng, size, pos)
        description = vocab.PRETRAIN_DESCRIBE_OBJECT.format(article=vocab.article(col), color=col, shape=s, position=pos)
        return _prompt(rng, "draw", description=description), "", None, \
            render_objects([(s, col, cx, cy, size // 7 + rng.randint(-2, 2))], size)
    # One scene in three holds a single shape: where an object is, and its colour or shape, is learned on
    # one object before it is bound among several.
    objs = random_scene(rng, size, 1 if rng.random() < 1 / 3 else None)
    img = render_objects(objs, size)
    s, col, cx, cy, _ = rng.choice(objs)
    if skill == "describe":
        return _prompt(rng, "describe"), describe_scene(objs, size), img, None
    if skill == "count":
        return _prompt(rng, "count"), str(len(objs)), img, None
    if skill == "locate":
        return _prompt(rng, "locate", color=col, shape=s), cell_name(cx, cy, size), img, None
    if skill == "name":
        return _prompt(rng, "name", color=col), s, img, None
    if skill == "color":
        return _prompt(rng, "color", shape=s), col, img, None
    if skill == "point":
        return _prompt(rng, "point", color=col, shape=s), f"[{cx / size:.2f},{cy / size:.2f}]", img, None
    if skill == "copy":
        return _prompt(rng, "copy"), "", img, img
    if skill == "verify":
        if rng.random() < 0.5:
            return _prompt(rng, "verify", article=vocab.article(col), color=col, shape=s), "yes", img, None
        s2, c2 = absent_shape_color(rng, objs)
        return _prompt(rng, "verify", article=vocab.article(c2), color=c2, shape=s2), "no", img, None
    if skill == "corners":
        r = next(o[4] for o in objs if o[0] == s)
        return _prompt(rng, "corners", color=col, shape=s), object_box(cx, cy, r, size), img, None
    if skill == "remove":
        if len(objs) == 1:  # a scene to remove from holds two or three shapes
            objs = random_scene(rng, size, rng.randint(2, 3))
            img = render_objects(objs, size)
            s, col = objs[0][:2]
        return _prompt(rng, "remove", color=col, shape=s), "", img, \
            render_objects([o for o in objs if o[0] != s], size)
    if skill == "add":
        if len(objs) == 3:  # a scene to add to holds one or two shapes
            objs = objs[:2]
            img = render_objects(objs, size)
        used = {cell_name(o[2], o[3], size) for o in objs}
        free = [p for p in vocab.CELL_NAMES if p not in used]
        s2 = rng.choice([sh for sh in vocab.SHAPES if sh not in {o[0] for o in objs}])
        c2, pos = rng.choice(tuple(vocab.COLORS)), rng.choice(free)
        x2, y2 = position_xy(rng, size, pos)
        description = vocab.PRETRAIN_DESCRIBE_OBJECT.format(article=vocab.article(c2), color=c2, shape=s2, position=pos)
        return _prompt(rng, "add", description=description), "", img, \
            render_objects([*objs, (s2, c2, x2, y2, size // 7 + rng.randint(-2, 2))], size)
    raise ValueError(f"unknown pretraining skill {skill!r}; skills: {', '.join(SKILLS)}")


def pretrain_examples(n: int, seed: int, image_cfg: ImageConfig) -> list[Example]:
    """n examples of the mixture, deterministic in ``seed``."""
    rng = random.Random(f"pretrain-{seed}")
    out = []
    for i in range(n):
        skill = rng.choices(SKILLS, weights=SKILL_WEIGHTS)[0]
        instruction, answer, image, target = draw_skill(rng, skill, image_cfg.size)
        views = positions = None
        if image is not None:
            views, positions = image_views(image, image_cfg)
        out.append(Example(task_id=-1, example_id=f"pretrain/{skill}/{i}", turns=[(instruction, answer)],
                           output_image=target is not None, views=views, positions=positions,
                           target=None if target is None else target_view(target, image_cfg)))
    return out


# ---------------------------------------------------------------------------------------------- vision stage
# Dense labels of one image for the ViT's own pretraining stage (as SEED-X's ViT was pretrained before
# the multimodal stage): per 3x3 cell its colour and shape (0 = empty), the object class, up to two
# digits and the text colour (0 = none).
VISION_HEADS = {"cell_color": (9, 1 + len(vocab.COLORS)), "cell_shape": (9, 1 + len(vocab.SHAPES)),
                "cls": (1, 1 + len(vocab.CLASSES)), "digits": (2, 11), "text_color": (1, 1 + len(vocab.COLORS))}
_COLOR_ID = {c: i + 1 for i, c in enumerate(vocab.COLORS)}


def vision_example(rng: random.Random, size: int):
    """(image, labels) with labels {head: list of class ids}, for `VISION_HEADS`."""
    labels = {"cell_color": [0] * 9, "cell_shape": [0] * 9, "cls": [0], "digits": [10, 10], "text_color": [0]}
    kind = rng.choices(("scene", "object", "digits"), weights=(3, 1, 1))[0]
    if kind == "scene":
        objs = random_scene(rng, size) if rng.random() < 0.7 else \
            [(rng.choice(vocab.SHAPES), rng.choice(tuple(vocab.COLORS)),
              *position_xy(rng, size, rng.choice(vocab.CELL_NAMES)), size // 7)]
        for s, c, x, y, _ in objs:
            cell = vocab.CELL_NAMES.index(cell_name(x, y, size))
            labels["cell_color"][cell], labels["cell_shape"][cell] = _COLOR_ID[c], 1 + vocab.SHAPES.index(s)
        return render_objects(objs, size), labels
    if kind == "object":
        img, cls = draw_object(rng, size)
        labels["cls"] = [1 + vocab.CLASSES.index(cls)]
        return img, labels
    text, color = random_number(rng), rng.choice(tuple(vocab.COLORS))
    labels["digits"] = [int(text[0]), int(text[1]) if len(text) > 1 else 10]
    labels["text_color"] = [_COLOR_ID[color]]
    return draw_number(rng, size, text, color), labels


# Per-token labels of a scene on a grid x grid layout of the image (the ViT's 8 x 8 tokens, the input
# resampler's 4 x 4): the colour and shape id (0 = empty) of the object covering each cell's centre. They
# teach each image token what lies in its own part of the image (docs/METHOD.md "The tiny model").
REGION_CLASSES = {"color": 1 + len(vocab.COLORS), "shape": 1 + len(vocab.SHAPES)}


def region_scene(rng: random.Random, size: int):
    """A scene for the region labels: 1-3 shapes (VQAv2's scenes) or, three times in ten, one shape of the largest size."""
    if rng.random() < 0.7:
        return random_scene(rng, size)
    return [(rng.choice(vocab.SHAPES), rng.choice(tuple(vocab.COLORS)),
             *position_xy(rng, size, rng.choice(vocab.CELL_NAMES)), size // 7)]


def region_labels(objs, grid: int, size: int) -> dict[str, list[int]]:
    """{"color": [...], "shape": [...]}, grid * grid ids each, row-major."""
    labels = {"color": [0] * grid * grid, "shape": [0] * grid * grid}
    for s, c, x, y, r in objs:
        for k in range(grid * grid):
            cx, cy = (k % grid + 0.5) * size / grid, (k // grid + 0.5) * size / grid
            if abs(cx - x) <= r and abs(cy - y) <= r:
                labels["color"][k], labels["shape"][k] = _COLOR_ID[c], 1 + vocab.SHAPES.index(s)
    return labels
