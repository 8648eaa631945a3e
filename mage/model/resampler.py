"""Qwen-VL's resampler: learnable queries cross-attending to a token sequence.

SEED-X uses it three times: the ViT's attention pool, the input resampler (ViT features -> LLM
embeddings) and the output resampler (LLM hidden states -> image features).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ResamplerConfig


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table (grid_size**2, embed_dim), row-major; first half encodes the column."""
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def resize_pos_embed(pos_embed: torch.Tensor, length: int) -> torch.Tensor:
    """Bicubically resize a square-grid table (L, C) to (length, C); length must be a square."""
    src, dst = math.isqrt(pos_embed.shape[0]), math.isqrt(length)
    if dst * dst != length:
        raise ValueError(f"cannot place {length} tokens on a square grid for the position embedding")
    if src == dst:
        return pos_embed
    grid = pos_embed.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(length, -1).to(pos_embed.dtype)


@functools.lru_cache(maxsize=16)
def window_mask(grid_size: int, num_keys: int, window: float, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(grid_size**2, num_keys) additive attention mask: 0 where a key may be read, -inf elsewhere; cached
    per device and dtype, so a forward pass does not copy it to the device again.

    A query reads the keys whose cell centre lies within `window` query cells of its own centre along
    each axis; both grids span the image and are row-major, the keys' on a square grid.
    """
    key_grid = math.isqrt(num_keys)
    if key_grid * key_grid != num_keys:
        raise ValueError(f"a windowed resampler needs its keys on a square grid, got {num_keys} keys")
    q = (torch.arange(grid_size, dtype=torch.float64) + 0.5) / grid_size
    k = (torch.arange(key_grid, dtype=torch.float64) + 0.5) / key_grid
    qy, qx = (t.reshape(-1, 1) for t in torch.meshgrid(q, q, indexing="ij"))
    ky, kx = (t.reshape(1, -1) for t in torch.meshgrid(k, k, indexing="ij"))
    reach = window / grid_size + 1e-9
    inside = ((qx - kx).abs() <= reach) & ((qy - ky).abs() <= reach)
    return torch.zeros(inside.shape, dtype=dtype).masked_fill(~inside, float("-inf")).to(device)


class Resampler(nn.Module):
    """(N, L, kv_dim) -> (N, grid_size**2, embed_dim) with one cross-attention layer."""

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.num_queries = config.num_queries
        self.embed_dim = config.embed_dim
        self.kv_dim = config.kv_dim
        self.grid_size = config.grid_size
        self.window = config.window
        self.output_positions = config.output_positions
        # A frozen Parameter (not a buffer) as in SEED-X, so state dicts and parameter counts match.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(config.embed_dim, config.grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.empty(config.num_queries, config.embed_dim))
        self.kv_proj = (nn.Linear(config.kv_dim, config.embed_dim, bias=False)
                        if config.kv_dim != config.embed_dim else nn.Identity())
        self.attn = nn.MultiheadAttention(config.embed_dim, config.num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.ln_kv = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.ln_out = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps) if config.output_norm else None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.query, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.kv_dim:
            raise ValueError(f"Resampler expects (N, L, {self.kv_dim}) input, got {tuple(x.shape)}")
        key_pos = resize_pos_embed(self.pos_embed, x.shape[1])
        x = self.ln_kv(self.kv_proj(x))
        query = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        mask = None
        if self.window > 0:
            mask = window_mask(self.grid_size, x.shape[1], self.window, x.device, x.dtype)
        out, _ = self.attn(query, x + key_pos, x, attn_mask=mask, need_weights=False)
        if self.ln_out is not None:
            out = self.ln_out(out)
        return out + self.pos_embed if self.output_positions else out
