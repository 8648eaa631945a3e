"""Per-example losses: each example's loss is averaged over its own tokens / elements only (docs/METHOD.md section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_example_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B,) mean next-token CE over each row's supervised tokens.

    Labels are shifted by one as in HF causal LMs; a row with no supervised token gets 0.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1)


def per_example_mse(reconstructed: torch.Tensor, target: torch.Tensor, owner: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
    """(M, Q, D) features of M output images owned by rows `owner` (M,) -> (B,) mean squared error.

    Row n's value is the mean over all elements of its output images (0 when it has none).
    """
    per_image = (reconstructed.float() - target.float()).pow(2).mean(dim=(1, 2))
    sums = per_image.new_zeros(batch_size).index_add(0, owner, per_image)
    counts = per_image.new_zeros(batch_size).index_add(0, owner, torch.ones_like(per_image))
    return sums / counts.clamp(min=1)
