"""The interface every continual-learning method implements, and what they share.

A method owns the choice of trainable parameters and whatever state it keeps across steps and tasks
(EMA, Fisher); it never sees the trainer. The trainer calls, per task:

    on_task_start(groups) -> param_groups()
    -> [per micro-batch: before_backward(n, accum), loss + loss_penalty() -> backward]
    -> [per step: before_clip(grad_of) -> optimizer step -> after_optimizer_step(),
        or discard_step() when the step's loss or gradient is not finite]
    -> on_task_end() -> on_task_end_data(batches, loss_of)
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mage.lora import MultiLoRALinear, iter_multi_lora

GradGetter = Callable[[nn.Parameter], torch.Tensor | None]
# ``batches(n)``: batches holding at least n examples (this rank's share) of the task just trained.
BatchSource = Callable[[int], Iterator[dict]]
# ``loss_of(batch)``: the model's loss on a batch, the mean of the per-example losses.
LossOf = Callable[[dict], torch.Tensor]
# Parameters never trained in SEED-X's SFT recipe: the vision tower (frozen, bf16).
FROZEN_PREFIXES = ("visual_encoder.",)
# The token embeddings and lm_head: trained in SEED-X (new special tokens), optional in the methods
# (`method.train_embeddings`; docs/TRAINING.md "Which parameters train").
EMBEDDING_PREFIXES = ("llm.model.embed_tokens.", "llm.lm_head.")
# The input resampler: trained in SEED-X, optional in the methods (`method.train_input_resampler`).
INPUT_RESAMPLER_PREFIXES = ("input_resampler.",)


def lora_group_params(model: nn.Module, groups: Sequence[int] | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA group parameter (of ``groups`` only, when given)."""
    for name, m in iter_multi_lora(model):
        for g in range(m.num_groups) if groups is None else groups:
            yield f"{name}.lora_A_groups.{g}", m.lora_A_groups[g]
            yield f"{name}.lora_B_groups.{g}", m.lora_B_groups[g]


def non_lora_trainables(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """SEED-X's other trainables: everything the model leaves trainable except LoRA, the wrapped base
    weights and the vision tower (embeddings, lm_head, norms, resamplers, patch_pos_embed)."""
    lora_ids = {id(p) for _, p in lora_group_params(model)}
    base_ids = {id(p) for _, m in iter_multi_lora(model) for p in m.base.parameters()}
    out = []
    for name, p in model.named_parameters():
        if id(p) in lora_ids or id(p) in base_ids or name.startswith(FROZEN_PREFIXES):
            continue
        if p.requires_grad:
            out.append((name, p))
    return out


def decay_split(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norm weights, biases) do not (the usual transformer rule)."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@torch.no_grad()
def copy_state_(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor], mismatch: str,
                ignore: frozenset[str] = frozenset()) -> None:
    """Copy ``state[k]`` into every target tensor once the keys match exactly (``ignore``: keys the caller
    restores itself); ``mismatch`` starts the error that names the missing and unexpected keys."""
    missing, unexpected = sorted(set(targets) - set(state)), sorted(set(state) - set(targets) - ignore)
    if missing or unexpected:
        raise ValueError(f"{mismatch}: missing {missing[:3]}, unexpected {unexpected[:3]} (was the checkpoint "
                         f"written by another method/config?)")
    for k, t in targets.items():
        t.copy_(state[k])


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum same-dtype tensors over ranks in one collective (no-op when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_fisher_(modules: Sequence[MultiLoRALinear]) -> None:
    """Sum every layer's Fisher sums and example counts over data-parallel ranks, in place.

    Only the rank rows of the trainable groups travel: backward adds Fisher terms nowhere else, so the
    frozen rows are equal on every rank (a quarter of the bytes when three of four groups train).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rows = [m.grad_rows() for m in modules]
    parts = [t for m, r in zip(modules, rows) for t in (m.fisher_A.index_select(0, r), m.fisher_B.index_select(1, r))]
    all_reduce_sum_(parts)
    for i, (m, r) in enumerate(zip(modules, rows)):
        m.fisher_A.index_copy_(0, r, parts[2 * i])
        m.fisher_B.index_copy_(1, r, parts[2 * i + 1])
    all_reduce_sum_([m.fisher_count for m in modules])


class ContinualMethod:
    """Base: trains the LoRA groups given by ``lora_groups_for`` plus (optionally) the non-LoRA trainables."""

    name = "base"
    # How the trainer schedules the tasks: "sequential" (one phase per task, a row after each), "joint"
    # (one phase on all tasks' data mixed, one row) or "none" (no training: the zero-shot row is the result).
    schedule = "sequential"
    # The MethodConfig fields this method reads besides `name` and the shared train_* switches: a change in
    # another method's field (say MAGE's pema_horizon) leaves its runs as they were (`unread_config_fields`).
    config_fields: tuple[str, ...] = ()

    def __init__(self, cfg, model: nn.Module):
        self.cfg = cfg
        self.model = model
        self.modules: list[MultiLoRALinear] = [m for _, m in iter_multi_lora(model)]
        if not self.modules:
            raise ValueError(f"method {self.name!r} needs a model with MultiLoRALinear layers "
                             "(wrap it with mage.lora.wrap_llama_lora first)")
        # Recorded once, before any group masking flips requires_grad.
        candidates = non_lora_trainables(model)
        self.extras = [(n, p) for n, p in candidates if cfg.train_non_lora and
                       (cfg.train_embeddings or not n.startswith(EMBEDDING_PREFIXES)) and
                       (cfg.train_input_resampler or not n.startswith(INPUT_RESAMPLER_PREFIXES))]
        kept = {id(p) for _, p in self.extras}
        for _, p in candidates:
            if id(p) not in kept:
                p.requires_grad_(False)
        self.groups: tuple[int, ...] = ()
        # Optimizer steps of the task about to start; the trainer sets it before on_task_start.
        self.steps_in_task: int | None = None

    # -- which groups a task trains
    def lora_groups_for(self, task_groups: Sequence[int]) -> tuple[int, ...]:
        raise NotImplementedError

    # -- hooks
    def on_task_start(self, task_groups: Sequence[int]) -> None:
        self.groups = self.lora_groups_for(task_groups)
        for m in self.modules:
            m.set_trainable_groups(self.groups)

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(lora_group_params(self.model, self.groups)) + self.extras

    def param_groups(self, weight_decay: float) -> list[dict]:
        return decay_split(self.trainable_named_parameters(), weight_decay)

    def before_backward(self, micro_batch_size: int, accumulation: int) -> None:
        """Called before each micro-batch's backward."""

    def loss_penalty(self) -> torch.Tensor | None:
        """A term added to every micro-batch's task loss before its backward (the trainer then divides the
        sum by the accumulation, so the penalty counts once per step); None adds nothing."""
        return None

    def before_clip(self, grad_of: GradGetter) -> None:
        """Called once per optimizer step with the averaged, not yet clipped gradients."""

    def after_optimizer_step(self) -> None:
        pass

    def discard_step(self) -> None:
        """Called instead of ``before_clip`` and ``after_optimizer_step`` when the trainer skips a step (its loss
        or gradient was not finite): drop what this step's backward accumulated, keep all other state."""
        for m in self.modules:
            m.reset_fisher()

    def on_task_end(self) -> None:
        pass

    def on_task_end_data(self, batches: BatchSource, loss_of: LossOf) -> None:
        """After ``on_task_end``, for methods that need a pass over the task just trained (EWC's Fisher, PGP's
        activation bases). The model is in eval mode with gradients enabled; no optimizer step follows."""

    def generator(self):
        """None, or an object with ``generate_text(batch, max_new_tokens)`` and ``generate_image_features(batch)``
        that evaluation uses in place of the model's own (LAE's two-model decoding)."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state but the checkpoint has {sorted(state)[:4]}...")
