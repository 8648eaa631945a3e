"""Example boundaries of packed variable-length batches (FlashAttention varlen's ``cu_seqlens``).

No triton import here: the eager reference validates with the same function.
"""
from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int, who: str) -> int:
    """Validate example boundaries of a packed batch; returns the number of examples."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{who}: cu_seqlens must be a 1-D int32 tensor of B + 1 example boundaries "
                         f"(as FlashAttention varlen), got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type == "cpu":
        # Value checks need the data on the host: free on CPU, a sync per call on CUDA, so only here.
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != num_tokens or (cu_seqlens.diff() < 0).any():
            raise ValueError(f"{who}: cu_seqlens must start at 0, never decrease and end at the number of "
                             f"tokens ({num_tokens}), got {cu_seqlens.tolist()}")
    return cu_seqlens.numel() - 1
