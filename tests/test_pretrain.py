"""The tiny base: pretraining is deterministic, the committed base matches the code, the trainer loads it."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
from safetensors.torch import load_file

from mage.data import vocab
from mage.data.images import ImageConfig
from mage.data.pretrain_mix import REGION_CLASSES, SKILLS, draw_skill, pretrain_examples, region_labels
from mage.model import build_model
from mage.model.pretrain import (REPO_ASSETS, PretrainConfig, base_key, file_key, file_name, load_base_, pretrain,
                                 resolve_base)

TINY = PretrainConfig(seed=3, vision_steps=2, vision_batch_size=4, connector_steps=2, steps=2, batch_size=4,
                      warmup_steps=1)


def test_mixture_is_deterministic_and_never_a_task_prompt():
    a = pretrain_examples(40, 5, ImageConfig.tiny())
    b = pretrain_examples(40, 5, ImageConfig.tiny())
    assert [e.turns for e in a] == [e.turns for e in b]
    assert all(torch.equal(x.views, y.views) for x, y in zip(a, b) if x.views is not None)
    # A template's text up to its first slot: "Where is the {color} {shape}?" -> "Where is the ".
    task_openings = {q.split("{")[0] for q in vocab.TASK_PROMPTS} - {""}
    for e in pretrain_examples(300, 0, ImageConfig.tiny()):
        instruction = e.turns[0][0]
        assert instruction not in vocab.TASK_PROMPTS
        assert not any(instruction.startswith(p) for p in task_openings)


def test_the_base_has_read_every_word_of_the_task_prompts():
    # The continual phase freezes the token embeddings: a prompt word the pretraining never wrote keeps
    # its random init, and the base cannot know what a question starting with it asks.
    import random

    from mage.data.tokenizer import build_tokenizer

    tok = build_tokenizer("tiny")
    rng = random.Random(0)
    fields = lambda: dict(color=rng.choice(tuple(vocab.COLORS)), shape=rng.choice(vocab.SHAPES),  # noqa: E731
                          shape2=rng.choice(vocab.SHAPES), position=rng.choice(vocab.CELL_NAMES), article="a",
                          description="a red circle at the top left")
    # The slots' words (colours, shapes, places) are filled in both; what is checked is each template's own text.
    slot_words = [*vocab.COLORS, *vocab.SHAPES, *vocab.CELL_NAMES, "a", "an"]
    pretrain_prompts = [p for prompts in vocab.PRETRAIN_PROMPTS.values() for p in prompts]
    seen = {w for text in [*slot_words, *vocab.PRETRAIN_SUFFIXES] for w in tok.tokenize(text)}
    seen |= {w for p in pretrain_prompts for w in tok.tokenize(p.format(**fields()))}
    unseen = {t: sorted(set(tok.tokenize(t.format(**fields()))) - seen) for t in vocab.TASK_PROMPTS}
    assert not {t: words for t, words in unseen.items() if words}


@pytest.mark.parametrize("skill", SKILLS)
def test_every_skill_draws(skill):
    import random
    instruction, answer, image, target = draw_skill(random.Random(0), skill, 112)
    assert instruction and (answer or target is not None)


def _color_pixels(image, color: str, box=None) -> int:
    import numpy as np
    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    if box is not None:
        x1, y1, x2, y2 = box
        a = a[y1:y2, x1:x2]
    return int((np.abs(a - np.array(vocab.COLORS[color])).sum(-1) < 30).sum())


def test_format_skills_say_what_the_image_holds():
    """verify answers yes/no about the scene, corners boxes the named shape, remove and add change it."""
    import random
    import re
    rng, size = random.Random(1), 112
    answers = []
    for _ in range(60):
        instruction, answer, image, _ = draw_skill(rng, "verify", size)
        color = next(c for c in vocab.COLORS if f" {c} " in instruction)
        assert answer in ("yes", "no") and (answer == "no" or _color_pixels(image, color) > 0)
        answers.append(answer)
    assert 15 < answers.count("yes") < 45
    for _ in range(30):
        instruction, answer, image, _ = draw_skill(rng, "corners", size)
        x1, y1, x2, y2 = (float(v) for v in re.fullmatch(r"\[([\d.]+),([\d.]+),([\d.]+),([\d.]+)\]", answer).groups())
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        color = next(c for c in vocab.COLORS if f" {c} " in instruction)
        # Two decimals place a corner within 1.12 pixels, and PIL fills the far edge's pixels too.
        x1, y1, x2, y2 = (round(v * size) + d for v, d in zip((x1, y1, x2, y2), (-1, -1, 2, 2)))
        assert _color_pixels(image, color, (x1, y1, x2, y2)) == _color_pixels(image, color)  # the shape lies in its box
        assert (x2 - x1) * (y2 - y1) < size * size / 9  # and the box is the shape's, not the scene's
    for _ in range(20):
        instruction, answer, image, target = draw_skill(rng, "remove", size)
        color = next(c for c in vocab.COLORS if f" {c} " in instruction)
        assert answer == "" and _color_pixels(image, color) > 0 and _color_pixels(target, color) < _color_pixels(image, color)
        instruction, answer, image, target = draw_skill(rng, "add", size)
        color = next(c for c in vocab.COLORS if f" {c} " in instruction)
        assert answer == "" and _color_pixels(target, color) > _color_pixels(image, color)


def test_region_labels_name_the_object_over_each_token():
    # A red circle of radius 14 centred at (20, 90) on a 112-pixel image: on the 4 x 4 grid (28-pixel
    # cells, centres 14, 42, 70, 98) it covers the centres x = 14 and y = 98 only: row 3, column 0.
    labels = region_labels([("circle", "red", 20, 90, 14)], 4, 112)
    circle = 1 + vocab.SHAPES.index("circle")
    red = 1 + list(vocab.COLORS).index("red")
    assert [k for k, c in enumerate(labels["color"]) if c] == [12] and labels["color"][12] == red
    assert labels["shape"][12] == circle and sum(map(bool, labels["shape"])) == 1
    # On the ViT's 8 x 8 grid (centres 7, 21, ..., 105) it covers x in {7, 21} and y in {77, 91}.
    on8 = region_labels([("circle", "red", 20, 90, 14)], 8, 112)
    assert {divmod(k, 8) for k, c in enumerate(on8["color"]) if c} == {(r, c) for r in (5, 6) for c in (0, 1)}
    assert max(labels["color"]) < REGION_CLASSES["color"] and max(labels["shape"]) < REGION_CLASSES["shape"]
    assert region_labels([], 4, 112) == {"color": [0] * 16, "shape": [0] * 16}


def test_pretrain_is_deterministic_and_loads(tmp_path):
    p1 = pretrain(TINY, tmp_path / "a", progress=False)
    p2 = pretrain(TINY, tmp_path / "b", progress=False)
    s1, s2 = load_file(str(p1)), load_file(str(p2))
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    fresh = build_model("tiny")
    load_base_(fresh, p1)
    assert all(torch.equal(v, s1[k]) for k, v in fresh.state_dict().items())
    # The ViT trained too: its weights moved from the seed's initial ones.
    torch.manual_seed(TINY.seed)
    initial = build_model("tiny").state_dict()
    vit = [k for k in s1 if k.startswith("visual_encoder.") and s1[k].ndim >= 2]
    assert vit and any(not torch.equal(s1[k], initial[k]) for k in vit)


def test_base_of_another_model_is_refused(tmp_path):
    path = pretrain(TINY, tmp_path, progress=False)
    state = load_file(str(path))
    state.pop(next(iter(state)))
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="not a base of this model"):
        load_base_(build_model("tiny"), tmp_path / "broken.safetensors")


def test_resolve_base_uses_cache_with_matching_key_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGE_CACHE", str(tmp_path))
    monkeypatch.setattr("mage.model.pretrain.PretrainConfig", lambda seed: dataclasses.replace(TINY, seed=seed))
    with pytest.raises(FileNotFoundError, match="python -m mage.model.pretrain"):
        resolve_base(7, build=False)
    built = resolve_base(7, progress=False)
    assert built.parent == tmp_path and resolve_base(7, build=False) == built
    # A file whose key does not match (other sizes, vocabulary or recipe) is not used.
    from safetensors.torch import save_file
    save_file(load_file(str(built)), str(built), metadata={"key": "stale"})
    with pytest.raises(FileNotFoundError):
        resolve_base(7, build=False)


def test_committed_base_matches_the_code():
    """A change to the tiny model, its vocabulary or the mixture must come with a rebuilt assets/ file."""
    path = REPO_ASSETS / file_name(0)
    assert path.is_file(), f"{path} is missing: python -m mage.model.pretrain --out assets --seed 0"
    tokenizer = build_model("tiny").tokenizer
    assert file_key(path) == base_key(PretrainConfig(seed=0), tokenizer), (
        "assets/tiny-base-seed0.safetensors is stale: rebuild it with python -m mage.model.pretrain --out assets "
        "--seed 0 and update its sha256 in docs/RESULTS.md")
    load_base_(build_model("tiny"), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    from pathlib import Path
    assert digest in (Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md").read_text()
