"""Baselines without PEMA: sequential LoRA fine-tune, and the ablations EW and EW+GA of Table 4 of the
Continual-NExT paper that introduces MAGE (docs/METHOD.md section 5)."""
from __future__ import annotations

from collections.abc import Sequence

from mage.methods.base import ContinualMethod


class SequentialLoRA(ContinualMethod):
    """One rank-(G*r) LoRA (all groups) trained on every task in turn; no EMA, no Fisher."""

    name = "lora"

    def lora_groups_for(self, task_groups: Sequence[int]) -> tuple[int, ...]:
        return tuple(range(self.modules[0].num_groups))


class EqualWeight(SequentialLoRA):
    """EW (paper Table 4): MoELoRA's four rank-r experts with the router replaced by an equal-weight sum,
    trained on every task. With the shared scaling alpha / (G r) that is exactly one rank-(G r) LoRA, so
    it computes what ``lora`` computes; it is kept under its own name for the ablation table."""

    name = "ew"


class GroupMasked(ContinualMethod):
    """EW+GA: the equal-weight groups, each task training only the groups of its modalities."""

    name = "ew_ga"

    def lora_groups_for(self, task_groups: Sequence[int]) -> tuple[int, ...]:
        num = self.modules[0].num_groups
        bad = [g for g in task_groups if not 0 <= g < num]
        if bad:
            raise ValueError(f"task asks for LoRA groups {bad} but the model has {num} groups")
        return tuple(sorted(set(task_groups)))
