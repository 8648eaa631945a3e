"""The two reference rows of the paper's Table 1 (docs/METHOD.md section 5): zero-shot (no training, the lower
bound) and joint training (every task's data at once, the upper bound of sequential training).

Neither is a continual method; each declares a ``schedule`` the trainer reads: ``joint`` trains one phase
on all tasks' training records shuffled together (the sum of the tasks' step budgets, the union of their
LoRA groups, i.e. one rank-(G r) LoRA plus the non-LoRA trainables, as ``lora``) and evaluates once;
``zero_shot`` trains nothing and its result is the zero-shot row.
"""
from __future__ import annotations

from collections.abc import Sequence

from mage.methods.base import ContinualMethod
from mage.methods.finetune import SequentialLoRA


class Joint(SequentialLoRA):
    name = "joint"
    schedule = "joint"


class ZeroShot(ContinualMethod):
    name = "zero_shot"
    schedule = "none"

    def lora_groups_for(self, task_groups: Sequence[int]) -> tuple[int, ...]:
        raise RuntimeError("zero_shot trains nothing: the trainer never starts a task for it")
