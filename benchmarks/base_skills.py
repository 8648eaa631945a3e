"""What a tiny base can do before any task: exact-match accuracy on each text skill of its pretraining mixture.

    python benchmarks/base_skills.py                         # the base the mini preset uses (model.base = "auto")
    python benchmarks/base_skills.py --base PATH --examples 200

Fresh examples of each skill (`mage.data.pretrain_mix.draw_skill`, a seed the pretraining never drew) are
answered greedily and compared exactly with the reference. The continual tasks build on these skills
(docs/METHOD.md section 9): a skill the base lacks has to be learned by the task's LoRA, which is a larger
change and forgets more. Rows are appended to benchmarks/results/base_skills.csv.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import platform
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mage, not an installed one

from mage.data.collate import Example, collate  # noqa: E402
from mage.data.images import ImageConfig, image_views  # noqa: E402
from mage.data.pretrain_mix import IMAGE_SKILLS, SKILLS, draw_skill  # noqa: E402
from mage.model.build import build_model  # noqa: E402
from mage.model.pretrain import load_base_, resolve_base  # noqa: E402
from mage.provenance import append_csv_rows, git_commit  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "base_skills.csv"
TEXT_SKILLS = tuple(s for s in SKILLS if s not in IMAGE_SKILLS)


def skill_examples(rng: random.Random, skill: str, first: int, stop: int, cfg: ImageConfig,
                   draw=draw_skill) -> tuple[list[Example], list[str]]:
    """Examples first..stop-1 of a skill, drawn from ``rng`` by ``draw(rng, skill, size)``, and their answers."""
    examples, references = [], []
    for i in range(first, stop):
        instruction, answer, image, _ = draw(rng, skill, cfg.size)
        views, positions = image_views(image, cfg)
        examples.append(Example(task_id=-1, example_id=f"{skill}/{i}", turns=[(instruction, answer)],
                                output_image=False, views=views, positions=positions, target=None))
        references.append(answer)
    return examples, references


@torch.no_grad()
def skill_accuracy(model, skill: str, n: int, seed: int = 0, batch_size: int = 100,
                   answers_seen: collections.Counter | None = None, draw=draw_skill) -> tuple[float, list[tuple]]:
    """Percent of n fresh examples answered exactly; and the first few (prompt, answer, reference).
    ``answers_seen`` (optional) counts every answer given: a base that writes the skill's format without
    the skill gives one answer to everything. ``draw(rng, skill, size)`` draws an example (default: the
    pretraining mixture's)."""
    cfg, rng = ImageConfig.tiny(), random.Random(f"skills-{seed}-{skill}")
    right, shown = 0, []
    for start in range(0, n, batch_size):
        examples, references = skill_examples(rng, skill, start, min(n, start + batch_size), cfg, draw)
        answers = model.generate_text(collate(examples, model.tokenizer, cfg, mode="generate"), 32)
        right += sum(a.strip() == r for a, r in zip(answers, references))
        if answers_seen is not None:
            answers_seen.update(a.strip() for a in answers)
        shown += [(e.turns[0][0], a, r) for e, a, r in zip(examples, answers, references)][: 3 - len(shown)]
    return 100.0 * right / n, shown


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="", help="a tiny base (.safetensors); default: the mini preset's")
    p.add_argument("--examples", type=int, default=200, help="per skill")
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = build_model("tiny")
    path = Path(a.base) if a.base else resolve_base(0, model.tokenizer)
    load_base_(model, path)
    model.eval()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    row = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
           "host": platform.node(), "base": path.name, "base_sha256": digest, "examples": a.examples}
    for skill in TEXT_SKILLS:
        seen = collections.Counter()
        acc, shown = skill_accuracy(model, skill, a.examples, answers_seen=seen)
        row[skill] = round(acc, 1)
        common = ", ".join(f"{k!r} x{v}" for k, v in seen.most_common(3))
        print(f"{skill:16s} {acc:5.1f}   e.g. {shown[0][1]!r} for {shown[0][2]!r}; commonest answers: {common}",
              flush=True)
    if not a.no_csv:
        append_csv_rows(RESULTS, list(row), [row])
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
