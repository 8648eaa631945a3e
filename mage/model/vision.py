"""Qwen-VL's ViT with an attention pool (SEED-X's frozen visual encoder).

Parameter names match Qwen-VL's checkpoint: conv1, positional_embedding, ln_pre,
transformer.resblocks.N.{ln_1, attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
attn_pool, ln_post, proj.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import ResamplerConfig, VisionConfig
from .resampler import Resampler, resize_pos_embed


class VisualAttention(nn.Module):
    """Self-attention whose fused in_proj lays q, k, v out per head: [q_h, k_h, v_h] for each head h."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.in_proj(x).view(batch, length, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_dim)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(mlp_dim, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(config.width, config.heads, config.mlp_dim, config.layer_norm_eps)
            for _ in range(config.layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """(N, 3, H, W) images -> (N, num_queries, output_dim) features."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(config.pos_embed_rows, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = Transformer(config)
        self.attn_pool = Resampler(ResamplerConfig(
            grid_size=int(config.num_queries ** 0.5), embed_dim=config.output_dim, num_heads=config.pool_heads,
            kv_dim=width, layer_norm_eps=config.layer_norm_eps, window=config.pool_window))
        self.ln_post = nn.LayerNorm(config.output_dim, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(config.output_dim ** -0.5 * torch.randn(config.output_dim, config.output_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"visual encoder expects images of shape (N, 3, {size}, {size}), got {tuple(images.shape)}")
        x = self.conv1(images.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (N, patches, width), patches row-major
        x = x + resize_pos_embed(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(self.attn_pool(x))
        return x @ self.proj
