"""The pretraining mixture of the tiny base model: general skills on the mini world, none of the six tasks.

A real MLLM comes to continual learning already able to see, read, count, locate, describe and draw.
This mixture gives the tiny SEED-X such skills with prompts that are NOT the Continual-NExT-mini task
prompts (`mage.data.vocab` PRETRAIN_*): the tasks then build on them, as the paper's tasks build on
SEED-X's pretraining. Examples are drawn in memory (no files) from one `random.Random(seed)`.

| skill | prompt | answer |
|---|---|---|
| describe a scene | "Describe the image." | "a red circle at the top left and a blue square at the center" |
| describe an object | "Describe the image." (ImageNet-style drawing) | "a cyan ring" |
| count | "Count the shapes." | "2" |
| locate | "Which part of the picture is the red circle in?" | "top left" |
| name | "Name the red thing." | "circle" |
| read | "Read the digits." | "47" |
| point | "Give the center of the red circle." | "[0.17,0.50]" |
| draw (text -> image) | "Draw a red circle at the top left." | the image |
| copy (image -> image) | "Copy the picture." | the same image |
"""
from __future__ import annotations

import random

from mage.data import vocab
from mage.data.collate import Example
from mage.data.draw import canvas, draw_class
from mage.data.images import ImageConfig, image_views, target_view
from mage.data.mini import _position_xy, _render, _scene, cell_name, draw_number, random_number

SKILLS = ("describe", "describe_object", "count", "locate", "name", "read", "point", "draw", "copy")
# Text skills dominate, as in an MLLM's pretraining; draw and copy train the image output path.
SKILL_WEIGHTS = (3, 1, 1, 2, 1, 2, 2, 2, 1)


def _describe(objs, size: int) -> str:
    objs = sorted(objs, key=lambda o: vocab.CELL_NAMES.index(cell_name(o[2], o[3], size)))
    parts = [vocab.PRETRAIN_DESCRIBE_OBJECT.format(article=vocab.article(c), color=c, shape=s,
                                                   position=cell_name(x, y, size)) for s, c, x, y, _ in objs]
    return " and ".join(parts)


def _scene_objs(rng: random.Random, size: int):
    return _scene(rng, size, rng.randint(1, 3), (size // 9, size // 7), size // 48)


def draw_skill(rng: random.Random, skill: str, size: int):
    """(instruction, answer text, input image or None, target image or None) of one example."""
    if skill == "describe_object":
        cls = rng.choice(vocab.CLASSES)
        img, d = canvas(size)
        c, j = size // 2, size // 16
        color = vocab.CLASS_COLORS[cls]
        draw_class(d, cls, color, c + rng.randint(-j, j), c + rng.randint(-j, j),
                   rng.randint(size * 3 // 10, size // 3), rng)
        return vocab.PRETRAIN_DESCRIBE, vocab.PRETRAIN_DESCRIBE_CLASS.format(
            article=vocab.article(color), color=color, cls=cls), img, None
    if skill == "read":
        text = random_number(rng)
        return vocab.PRETRAIN_READ, text, draw_number(rng, size, text, rng.choice(tuple(vocab.COLORS))), None
    if skill == "draw":
        s, col, pos = rng.choice(vocab.SHAPES), rng.choice(tuple(vocab.COLORS)), rng.choice(vocab.CELL_NAMES)
        cx, cy = _position_xy(rng, size, pos)
        description = vocab.PRETRAIN_DESCRIBE_OBJECT.format(article=vocab.article(col), color=col, shape=s, position=pos)
        return vocab.PRETRAIN_DRAW.format(description=description), "", None, \
            _render([(s, col, cx, cy, size // 7 + rng.randint(-2, 2))], size)
    objs = _scene_objs(rng, size)
    img = _render(objs, size)
    s, col, cx, cy, _ = rng.choice(objs)
    if skill == "describe":
        return vocab.PRETRAIN_DESCRIBE, _describe(objs, size), img, None
    if skill == "count":
        return vocab.PRETRAIN_COUNT, str(len(objs)), img, None
    if skill == "locate":
        return vocab.PRETRAIN_LOCATE.format(color=col, shape=s), cell_name(cx, cy, size), img, None
    if skill == "name":
        return vocab.PRETRAIN_NAME.format(color=col), s, img, None
    if skill == "point":
        return vocab.PRETRAIN_POINT.format(color=col, shape=s), f"[{cx / size:.2f},{cy / size:.2f}]", img, None
    if skill == "copy":
        return vocab.PRETRAIN_COPY, "", img, img
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
