"""How fast the base's LLM learns one skill of the pretraining mixture when trained on it alone.

    python benchmarks/skill_learning.py --skill verify --steps 1500 --lr 3e-3 --one-object
    python benchmarks/skill_learning.py --skill verify --steps 300 --lr 1e-3 --text-rule      # the control
    python benchmarks/skill_learning.py --skill name --steps 300 --lr 1e-3
    python benchmarks/skill_learning.py --skill verify --one-object --fresh-llm --llm-layers 4   # a deeper LLM
    python benchmarks/skill_learning.py --skill verify --one-object --fresh-llm --llm-width 256  # a wider LLM
    python benchmarks/skill_learning.py --skill verify --one-object --told 1 --eval-told        # the scene in words too
    python benchmarks/skill_learning.py --skill verify --one-object --colour-only --fresh-llm   # one attribute to compare
    python benchmarks/skill_learning.py --skill verify --told 0.5                              # half told, scored on images alone

Starts from the base the mini preset uses and trains what stage 2 of the pretraining trains (everything
but the ViT and the input resampler) on fresh examples of one skill, batch 16, AdamW without weight decay.
Every --eval-every steps it prints the training loss and the exact-match accuracy on 200 fresh examples
(`base_skills.skill_accuracy`), and appends the row to benchmarks/results/skill_learning.csv.

It asks why the base answers "Is there a red circle ...?" at chance (docs/RESULTS.md, "What keeps VQAv2
below 60"): whether the LLM cannot learn to compare a word of the question with what it sees, or only
learns it slowly. --skill verify always draws with `verify_drawer`: the mixture's verify prompts and
answers on scenes of 1-3 shapes (VQAv2's), without the mixture's answer-format suffixes or its extra share
of one-shape scenes (its rows say variant "mixture"). Three variants separate the parts:
- --one-object: scenes of one shape, so "yes" needs only the one object's colour and shape to be those
  of the question; a "no" asks for a pair the scene does not hold, as in the mixture.
- --colour-only: a "no" asks for a shape of the scene in a colour the scene does not hold, so the answer
  is whether the question's colour is in the image: one word compared with the image, no binding of a
  colour to a shape.
- --text-rule: the answer follows from the question alone ("yes" if its colour is one of the first four
  of `vocab.COLORS`), the same prompts and images: a control for learning the yes/no format at all.
--fresh-llm keeps the base's ViT and resamplers and starts the LLM from random weights, with
--llm-layers layers (default the tiny preset's): whether depth, not the base's pretraining, sets the pace.
--llm-width W makes that new LLM W wide, its image tokens the base's input resampler's projected to W by a
trained linear layer (the output resampler and patch_pos_embed are new too; text skills do not use the former):
whether width does.
--told P writes the scene in words before the question on a share P of the training examples (the base's
own describe answer, "a red circle at the top left. Does the picture show ...?"; the image stays): whether
the plateau is in comparing a word with an image token or in comparing two things at all, and whether
examples where the comparison is between words help the one with the image. Scoring is on the image alone
unless --eval-told writes the scene in words on every scored example too.
--train-input-resampler trains the input resampler with the LLM (stage 2 of the pretraining keeps it frozen):
whether image tokens that may move towards the words are compared with them sooner.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mage, not an installed one

from base_skills import TEXT_SKILLS, skill_accuracy, skill_examples  # noqa: E402
from continual_table import machine_name  # noqa: E402

from mage.data import vocab  # noqa: E402
from mage.data.collate import collate  # noqa: E402
from mage.data.images import ImageConfig  # noqa: E402
from mage.data.mini import absent_shape_color, random_scene, render_objects  # noqa: E402
from mage.data.pretrain_mix import describe_scene, draw_skill  # noqa: E402
from mage.model.build import build_model  # noqa: E402
from mage.model.config import get_config  # noqa: E402
from mage.model.pretrain import load_base_, resolve_base  # noqa: E402
from mage.provenance import append_csv_rows, git_commit  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "skill_learning.csv"
YES_COLORS = tuple(vocab.COLORS)[:4]  # --text-rule: "yes" exactly for these colours


def verify_drawer(one_object: bool, text_rule: bool, told: float = 0.0, colour_only: bool = False):
    """A `draw(rng, skill, size)` for verify with the variant's scenes and answers; a share ``told`` of the
    prompts starts with the scene in words."""
    def draw(rng: random.Random, skill: str, size: int):
        objs = random_scene(rng, size, 1 if one_object else None)
        s, col = rng.choice(objs)[:2]
        if text_rule:
            s, col = rng.choice(vocab.SHAPES), rng.choice(tuple(vocab.COLORS))
            answer = "yes" if col in YES_COLORS else "no"
        elif rng.random() < 0.5:
            answer = "yes"
        elif colour_only:
            col, answer = rng.choice([c for c in vocab.COLORS if c not in {o[1] for o in objs}]), "no"
        else:
            (s, col), answer = absent_shape_color(rng, objs), "no"
        prompt = rng.choice(vocab.PRETRAIN_PROMPTS["verify"]).format(article=vocab.article(col), color=col, shape=s)
        if told and rng.random() < told:
            prompt = f"{describe_scene(objs, size)}. {prompt}"
        return prompt, answer, render_objects(objs, size), None
    return draw


class ProjectedResampler(torch.nn.Module):
    """The base's input resampler, its tokens projected to a wider LLM by a linear layer (``proj``)."""

    def __init__(self, resampler: torch.nn.Module, width: int):
        super().__init__()
        self.resampler, self.proj = resampler, torch.nn.Linear(resampler.embed_dim, width)
        # SeedXModel reads the input side's dtype from `query` and sizes its image-free dummy pass by `kv_dim`.
        self.query, self.kv_dim = resampler.query, resampler.kv_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.resampler(features))


def build_learner(fresh_llm: bool, llm_layers: int | None, llm_width: int | None = None):
    """The tiny model from its base; with ``fresh_llm`` its LLM (``llm_layers`` deep, ``llm_width`` wide)
    keeps its random weights."""
    config = get_config("tiny")
    if llm_layers is not None:
        config = config.replace(llm=dataclasses.replace(config.llm, num_layers=llm_layers))
    if llm_width is not None:
        base_llm = config.llm
        config = config.replace(
            llm=dataclasses.replace(base_llm, hidden_size=llm_width,
                                    intermediate_size=base_llm.intermediate_size * llm_width // base_llm.hidden_size),
            input_resampler=dataclasses.replace(config.input_resampler, embed_dim=llm_width),
            output_resampler=dataclasses.replace(config.output_resampler, kv_dim=llm_width))
    model = build_model("tiny", config=config)
    path = resolve_base(0, model.tokenizer)
    if not fresh_llm:
        load_base_(model, path)  # checks every key: a base exists for the preset's depth only
        return model
    if llm_width is not None:
        base = build_model("tiny")
        load_base_(base, path)
        model.visual_encoder.load_state_dict(base.visual_encoder.state_dict())
        model.input_resampler = ProjectedResampler(base.input_resampler, llm_width)
        return model
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("llm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("llm.") for k in missing):
        raise ValueError(f"{path} does not fit this model outside its LLM: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skill", default="verify", choices=TEXT_SKILLS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--one-object", action="store_true", help="verify only: scenes of one shape")
    p.add_argument("--colour-only", action="store_true", help="verify only: a no asks for a colour the scene lacks")
    p.add_argument("--text-rule", action="store_true", help="verify only: the answer follows from the question")
    p.add_argument("--fresh-llm", action="store_true", help="the LLM from random weights (ViT, resamplers from the base)")
    p.add_argument("--llm-layers", type=int, default=None, help="with --fresh-llm: the LLM's depth (default the preset's)")
    p.add_argument("--llm-width", type=int, default=None, help="with --fresh-llm: the LLM's width (default the preset's)")
    p.add_argument("--told", type=float, default=0.0, help="verify only: share of training prompts with the scene in words")
    p.add_argument("--eval-told", action="store_true", help="verify only: score with the scene in words on every prompt")
    p.add_argument("--train-input-resampler", action="store_true", help="train the input resampler too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    if (a.one_object or a.colour_only or a.text_rule or a.told or a.eval_told) and a.skill != "verify":
        p.error("--one-object, --colour-only, --text-rule, --told and --eval-told are variants of --skill verify")
    if a.colour_only and a.text_rule:
        p.error("--colour-only and --text-rule are two different answers: choose one")
    if not 0 <= a.told <= 1:
        p.error(f"--told {a.told}: a share of the training examples, 0 to 1")
    if a.llm_layers is not None and (not a.fresh_llm or a.llm_layers < 1):
        p.error("--llm-layers N (N >= 1) needs --fresh-llm: the base exists for the tiny preset's depth only")
    heads = get_config("tiny").llm.num_heads
    if a.llm_width is not None and (not a.fresh_llm or a.llm_width < heads or a.llm_width % heads):
        p.error(f"--llm-width W (a multiple of the {heads} heads) needs --fresh-llm: the base exists for the tiny preset's width only")
    variant = "+".join(v for v, on in (("one-object", a.one_object), ("colour-only", a.colour_only),
                                       ("text-rule", a.text_rule), (f"told-{a.told:g}", a.told), ("eval-told", a.eval_told),
                                       ("input-resampler-trained", a.train_input_resampler)) if on) or "mixture"
    draw = eval_draw = draw_skill
    if a.skill == "verify":
        draw = verify_drawer(a.one_object, a.text_rule, a.told, a.colour_only)
        eval_draw = verify_drawer(a.one_object, a.text_rule, 1.0 if a.eval_told else 0.0, a.colour_only)

    torch.manual_seed(a.seed)
    model = build_learner(a.fresh_llm, a.llm_layers, a.llm_width)
    llm = f"fresh-{model.config.llm.num_layers}-layers" if a.fresh_llm else "base"
    if a.llm_width is not None:
        llm += f"-width-{a.llm_width}"
    # What stage 2 freezes: the ViT and the base's input resampler (a wider LLM's projection of its tokens is
    # as new as the LLM and trains with it).
    base_resampler = getattr(model.input_resampler, "resampler", model.input_resampler)
    frozen_modules = [model.visual_encoder] + ([] if a.train_input_resampler else [base_resampler])
    frozen = {id(q) for m in frozen_modules for q in m.parameters()}
    params = [q for q in model.parameters() if id(q) not in frozen]
    model.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    cfg, rng = ImageConfig.tiny(), random.Random(f"skill-learning-{a.seed}")
    common = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "commit": git_commit(),
              "machine": machine_name(), "skill": a.skill, "variant": variant, "llm": llm, "lr": a.lr, "batch_size": a.batch_size,
              "seed": a.seed}
    rows, t0, loss = [], time.time(), float("nan")
    for step in range(a.steps + 1):
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            acc, _ = skill_accuracy(model, a.skill, 200, seed=1000 + a.seed, draw=eval_draw)
            rows.append({**common, "step": step, "train_loss": round(loss, 4), "accuracy": round(acc, 1),
                         "seconds": round(time.time() - t0)})
            print(f"{a.skill} ({variant}, {llm} LLM) step {step:5d}  loss {loss:.3f}  accuracy {acc:5.1f}", flush=True)
            model.train()
        if step == a.steps:
            break
        examples, _ = skill_examples(rng, a.skill, 0, a.batch_size, cfg, draw)
        out = model(collate(examples, model.tokenizer, cfg, mode="train"))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % a.eval_every == 0:
            loss = out.loss.item()  # .item() on evaluation steps only
    if not a.no_csv:
        append_csv_rows(RESULTS, list(rows[0]), rows)
        print(f"appended to {RESULTS}")
    return rows


if __name__ == "__main__":
    main()
