"""Position ids that ignore padding, for left- and right-padded batches alike."""
from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (pads get 0)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
