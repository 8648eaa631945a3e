"""benchmarks/base_skills.py scores exact answers per skill; benchmarks/base_probe.py reads labels off features."""
import collections
import random
import sys
from pathlib import Path

import torch

from mage.data.images import ImageConfig
from mage.data.pretrain_mix import VISION_HEADS, draw_skill
from mage.data.tokenizer import build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import base_probe  # noqa: E402
import base_skills  # noqa: E402


class AlwaysSays:
    """A stand-in model that answers every prompt with the same text."""

    def __init__(self, text):
        self.text, self.tokenizer = text, build_tokenizer("tiny")

    def generate_text(self, batch, max_new_tokens):
        return [self.text] * batch["input_ids"].shape[0]


def test_skill_accuracy_is_the_share_of_exact_answers():
    n = 40
    rng = random.Random("skills-0-count")
    references = [draw_skill(rng, "count", ImageConfig.tiny().size)[1] for _ in range(n)]
    expected = 100.0 * references.count("2") / n
    assert 0 < expected < 100  # the scenes hold 1-3 shapes, so the test can tell right from wrong
    acc, shown = base_skills.skill_accuracy(AlwaysSays("2"), "count", n, batch_size=16)
    assert acc == expected
    assert len(shown) == 3 and all(answer == "2" for _, answer, _ in shown)
    assert base_skills.skill_accuracy(AlwaysSays("nothing"), "count", n)[0] == 0.0
    seen = collections.Counter()
    base_skills.skill_accuracy(AlwaysSays("2"), "count", n, batch_size=16, answers_seen=seen)
    assert seen == {"2": n}


def test_every_text_skill_is_scored_and_image_skills_are_not():
    assert not {"draw", "copy", "remove", "add"} & set(base_skills.TEXT_SKILLS)
    assert {"count", "locate", "read", "classify", "verify", "corners"} <= set(base_skills.TEXT_SKILLS)


def test_probe_reads_a_label_that_the_features_hold_and_not_one_they_do_not():
    rng = random.Random(0)
    labels = [{name: [rng.randrange(k) for _ in range(n)] for name, (n, k) in VISION_HEADS.items()} for _ in range(300)]
    # features = the one-hot class label plus noise: only "cls" is readable
    num_classes = VISION_HEADS["cls"][1]
    feats = torch.nn.functional.one_hot(torch.tensor([lab["cls"][0] for lab in labels]), num_classes).float()
    feats = feats + 0.1 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(0))
    acc = base_probe.probe_accuracy(feats, labels, n_train=200)
    assert acc["cls"] > 95
    assert acc["text_color"] < 100 / VISION_HEADS["text_color"][1] + 15  # near chance


def test_locality_finds_the_token_over_the_shape_and_not_a_global_one():
    size = 112

    def local(images):  # token k = the mean of its own 28-pixel block: local by construction
        return torch.nn.functional.avg_pool2d(images, 28).flatten(2).transpose(1, 2)

    def global_(images):  # every token the same image mean, with a fixed per-token offset
        return images.mean((2, 3))[:, None, :] * torch.linspace(1, 2, 16)[None, :, None]

    got = base_probe.token_locality({"local": local, "global": global_}, size, n=60)
    assert got["local"] > 90
    assert got["global"] < 30  # the last token always "changes most": right only for its own cell
