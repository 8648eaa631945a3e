"""What a trained model answers: accuracy per question form, the commonest wrong answers and first tokens.

    python benchmarks/answers_by_question.py RUN_DIR TAG TASK [TASK ...]
    python benchmarks/answers_by_question.py runs/mini task06_end vqav2 imagenet ocrvqa

RUN_DIR is a run folder (its config.json), TAG a checkpoint in RUN_DIR/checkpoints (`task01_end` is the
model right after the first task). Each text task's test set is answered greedily, as the evaluation does,
scored by the task's scorer, and grouped by its question with colours, shapes and classes masked ("What color is the X?"). The first
generated token shows the format the model chose: "<img>" where a text question is answered with an image,
"[" where it is answered with a box. Nothing is written; the run folder is read only.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mage.data import vocab  # noqa: E402

_WORDS = sorted({*vocab.COLORS, *vocab.SHAPES, *vocab.CLASSES}, key=len, reverse=True)
_MASK = re.compile(r"\b(" + "|".join(_WORDS) + r")\b")


def question_form(question: str) -> str:
    """The question with its colour, shape and class words masked: one row per form."""
    return _MASK.sub("X", question)


def group_answers(questions, predictions, references, correct) -> dict[str, dict]:
    """{form: {"right": n, "total": n, "wrong": Counter of (reference, prediction)}}, by question form;
    ``correct`` is the task scorer's verdict per example (`mage.eval.scorers.score_text`)."""
    out: dict[str, dict] = {}
    for q, p, r, ok in zip(questions, predictions, references, correct):
        row = out.setdefault(question_form(q), {"right": 0, "total": 0, "wrong": collections.Counter()})
        row["total"] += 1
        if ok:
            row["right"] += 1
        else:
            row["wrong"][(r, p)] += 1
    return out


@contextlib.contextmanager
def open_run(run_dir: Path):
    """The run's model and trainer, built from its config.json with a scratch run folder (the real one is
    only read), on CPU with one thread: yields (trainer, info)."""
    from mage.trainer import distributed
    from mage.trainer.config import apply_overrides, config_from_dict
    from mage.trainer.loop import SequenceTrainer

    saved = json.loads((run_dir / "config.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            cfg = apply_overrides(config_from_dict(saved), {"run.out_dir": scratch})
            info = distributed.init_distributed("cpu")
            yield SequenceTrainer(cfg, info), info
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) keeps its own setting


def checkpoint_path(run_dir: Path, tag: str) -> Path:
    """RUN_DIR/checkpoints/TAG.safetensors, or an exit that lists the run's checkpoints."""
    ckpt = run_dir / "checkpoints" / f"{tag}.safetensors"
    if not ckpt.is_file():
        tags = sorted(f.name.removesuffix(".safetensors") for f in (run_dir / "checkpoints").glob("*.safetensors"))
        raise SystemExit(f"{ckpt} not found; checkpoints of this run: {', '.join(tags) or 'none'}")
    return ckpt


def load_tensors_(trainer, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's model tensors into the trainer's model and switch it to eval mode."""
    from mage.trainer.loop import load_model_tensors_

    load_model_tensors_(trainer.model, trainer.method, tensors, prefixes=("model.",))
    trainer.model.eval()


def answer_task(trainer, info, name: str, max_new_tokens: int):
    """Answer a text task's whole test set greedily, as the evaluation does: (score, records,
    predictions, correct per example, Counter of first tokens)."""
    from mage.data.dataset import build_dataloader
    from mage.data.readers import load_test_records
    from mage.eval.scorers import score_text
    from mage.model.generation import greedy_tokens, tokens_to_texts
    from mage.trainer.data import image_config, reader_options, to_device

    model, cfg = trainer.model, trainer.cfg
    tok = model.tokenizer
    task = next((t for t in trainer.tasks if t.name == name), None)
    if task is None or task.output != "text":
        raise SystemExit(f"{name!r} is not a text task of this run: {', '.join(t.name for t in trainer.tasks)}")
    records = load_test_records(name, trainer.data_root, reader_options(cfg.data))
    loader = build_dataloader(records, tok, image_config(model, name), 100, mode="generate", shuffle=False)
    predictions, firsts = [], collections.Counter()
    for batch in loader:
        tokens = greedy_tokens(model, to_device(batch, info.device), max_new_tokens, tok.eos_token_id,
                               tok.pad_token_id)
        firsts.update(tok.convert_ids_to_tokens([row[0] for row in tokens.tolist()]))
        predictions += tokens_to_texts(tok, tokens)
    score, correct = score_text(name, predictions, [r.answer for r in records])
    return score, records, predictions, correct, firsts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("tag", help="a checkpoint of RUN_DIR/checkpoints, e.g. task06_end")
    p.add_argument("tasks", nargs="+", help="text tasks to answer")
    p.add_argument("--max-new-tokens", type=int, default=24)
    a = p.parse_args(argv)

    ckpt = checkpoint_path(a.run_dir, a.tag)
    with open_run(a.run_dir) as (trainer, info):
        load_tensors_(trainer, load_file(str(ckpt)))
        for name in a.tasks:
            score, records, predictions, correct, firsts = answer_task(trainer, info, name, a.max_new_tokens)
            groups = group_answers([r.turns[0][0] for r in records], predictions, [r.answer for r in records],
                                   correct)
            print(f"\n{name} after {a.tag}: {score:.1f}% ({sum(correct)}/{len(records)}, the task's scorer); "
                  f"first tokens: {firsts.most_common(5)}")
            for form, g in sorted(groups.items(), key=lambda kv: -kv[1]["total"]):
                wrong = ", ".join(f"{r!r}->{p!r} x{n}" for (r, p), n in g["wrong"].most_common(3))
                print(f"  {100 * g['right'] / g['total']:5.1f}% of {g['total']:3d}  {form}   wrong: {wrong}")


if __name__ == "__main__":
    main()
