"""Which part of a task's update does the forgetting: an earlier checkpoint with one part from a later one.

    python benchmarks/forgetting_by_part.py RUN_DIR BEFORE AFTER TASK [TASK ...]
    python benchmarks/forgetting_by_part.py runs/mini task04_end task05_end imagenet ocrvqa

BEFORE and AFTER are checkpoints of the run (`task04_end` is the model right after the fourth task). The
text tasks are answered, as the evaluation does, by BEFORE, by AFTER, and by BEFORE with each trained part
taken from AFTER alone: the LoRA groups, the input resampler, the output resampler, the norms, the patch
position embedding, the token embeddings and lm_head (only the parts that differ). A part whose row falls
to AFTER's score is where the forgetting is. Nothing is written; the run folder is read only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from answers_by_question import answer_task, checkpoint_path, load_tensors_, open_run  # noqa: E402

from mage.methods.base import EMBEDDING_PREFIXES, INPUT_RESAMPLER_PREFIXES  # noqa: E402

# (part, test on a model tensor's name without "model."); the first that matches names the part.
PARTS = (
    ("LoRA groups", lambda n: ".lora_" in n),
    ("input resampler", lambda n: n.startswith(INPUT_RESAMPLER_PREFIXES)),
    ("output resampler", lambda n: n.startswith("output_resampler.")),
    ("norms", lambda n: n.startswith("llm.") and ("norm" in n.rsplit(".", 2)[-2])),
    ("patch_pos_embed", lambda n: n == "patch_pos_embed"),
    ("embeddings and lm_head", lambda n: n.startswith(EMBEDDING_PREFIXES)),
)


def part_of(name: str) -> str:
    """The part a checkpoint's model tensor belongs to ("other" when none of PARTS)."""
    bare = name.removeprefix("model.")
    return next((part for part, test in PARTS if test(bare)), "other")


def changed_parts(before: dict, after: dict) -> list[str]:
    """The parts with at least one model tensor that differs between the two checkpoints, in PARTS order."""
    changed = {part_of(k) for k in before if k.startswith("model.") and not before[k].equal(after[k])}
    return [p for p, _ in PARTS if p in changed] + (["other"] if "other" in changed else [])


def with_part(before: dict, after: dict, part: str) -> dict:
    """BEFORE's tensors with the model tensors of ``part`` taken from AFTER."""
    return {k: after[k] if k.startswith("model.") and part_of(k) == part else t for k, t in before.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("before", help="the earlier checkpoint, e.g. task04_end")
    p.add_argument("after", help="the later checkpoint, e.g. task05_end")
    p.add_argument("tasks", nargs="+", help="text tasks to answer")
    p.add_argument("--max-new-tokens", type=int, default=24)
    a = p.parse_args(argv)

    before = load_file(str(checkpoint_path(a.run_dir, a.before)))
    after = load_file(str(checkpoint_path(a.run_dir, a.after)))
    rows = [(a.before, before), (a.after, after)]
    rows += [(f"{a.before} + {part} of {a.after}", with_part(before, after, part))
             for part in changed_parts(before, after)]
    print(f"| model | {' | '.join(a.tasks)} |\n|---|{'---|' * len(a.tasks)}")
    with open_run(a.run_dir) as (trainer, info):
        for label, tensors in rows:
            load_tensors_(trainer, tensors)
            scores = [answer_task(trainer, info, t, a.max_new_tokens)[0] for t in a.tasks]
            print(f"| {label} | {' | '.join(f'{s:.1f}' for s in scores)} |", flush=True)


if __name__ == "__main__":
    main()
