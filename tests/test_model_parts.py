"""The ViT and the resampler against written-out references of Qwen-VL's math."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mage.model.config import ResamplerConfig, tiny_config
from mage.model.resampler import Resampler, resize_pos_embed, sincos_pos_embed_2d
from mage.model.vision import VisionTransformer, VisualAttention

ATOL = 1e-5  # fp32, reordered sums


def numpy_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's 2-D sin-cos table written with numpy: meshgrid(w, h), w first, sin then cos per axis."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size), np.arange(grid_size)), axis=0).astype(np.float64)
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("embed_dim,grid", [(64, 4), (128, 8), (12, 3)])
def test_sincos_table_matches_numpy(embed_dim, grid):
    ours = sincos_pos_embed_2d(embed_dim, grid)
    assert ours.shape == (grid * grid, embed_dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.from_numpy(numpy_sincos(embed_dim, grid)).float())


def test_resize_pos_embed():
    table = torch.randn(16, 8)
    assert resize_pos_embed(table, 16) is table
    resized = resize_pos_embed(table, 64)
    grid = table.reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(64, 8)
    torch.testing.assert_close(resized, expected)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(table, 15)


def reference_resampler(r: Resampler, x: torch.Tensor) -> torch.Tensor:
    """Single cross-attention with nn.MultiheadAttention's packed in_proj, written out per head."""
    e, heads = r.embed_dim, r.attn.num_heads
    kv = F.layer_norm(x @ r.kv_proj.weight.T if r.kv_dim != e else x, (e,), r.ln_kv.weight, r.ln_kv.bias, r.ln_kv.eps)
    side = math.isqrt(x.shape[1])
    key_pos = F.interpolate(r.pos_embed.reshape(1, math.isqrt(r.num_queries), -1, e).permute(0, 3, 1, 2),
                            size=(side, side), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(-1, e)
    q = F.layer_norm(r.query, (e,), r.ln_q.weight, r.ln_q.bias, r.ln_q.eps) + r.pos_embed
    wq, wk, wv = r.attn.in_proj_weight.chunk(3)
    bq, bk, bv = r.attn.in_proj_bias.chunk(3)
    # The tiny model's window: query cell (i, j) of a g x g grid reads key cell (a, b) of the side x side
    # grid when both centres are within window / g of each other along each axis (fractions of the image).
    g = math.isqrt(r.num_queries)
    allowed = torch.ones(r.num_queries, x.shape[1], dtype=torch.bool)
    if r.window > 0:
        for qi in range(r.num_queries):
            for ki in range(x.shape[1]):
                (i, j), (a, b) = divmod(qi, g), divmod(ki, side)
                allowed[qi, ki] = (abs((j + 0.5) / g - (b + 0.5) / side) <= r.window / g + 1e-9
                                   and abs((i + 0.5) / g - (a + 0.5) / side) <= r.window / g + 1e-9)
    outs = []
    for n in range(x.shape[0]):
        Q, K, V = q @ wq.T + bq, (kv[n] + key_pos) @ wk.T + bk, kv[n] @ wv.T + bv
        d = e // heads
        heads_out = []
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            scores = (Q[:, s] @ K[:, s].T / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
            heads_out.append(torch.softmax(scores, dim=-1) @ V[:, s])
        out = torch.cat(heads_out, dim=-1) @ r.attn.out_proj.weight.T + r.attn.out_proj.bias
        if r.ln_out is not None:
            out = F.layer_norm(out, (e,), r.ln_out.weight, r.ln_out.bias, r.ln_out.eps)
        outs.append(out + r.pos_embed if r.output_positions else out)
    return torch.stack(outs)


@pytest.mark.parametrize("kv_dim,length,tiny", [(128, 64, {}), (64, 9, {}), (48, 16, {}),
                                                 (48, 64, {"window": 0.5, "output_norm": True, "output_positions": True}),
                                                 (48, 36, {"window": 1.0})])
def test_resampler_matches_reference(kv_dim, length, tiny):
    torch.manual_seed(0)
    r = Resampler(ResamplerConfig(grid_size=4, embed_dim=64, num_heads=4, kv_dim=kv_dim, **tiny))
    with torch.no_grad():  # non-trivial norms so ln_q / ln_kv / ln_out are really exercised
        for ln in (r.ln_q, r.ln_kv) + ((r.ln_out,) if r.ln_out is not None else ()):
            ln.weight.normal_(1.0, 0.1)
            ln.bias.normal_(0.0, 0.1)
    x = torch.randn(3, length, kv_dim)
    out = r(x)
    assert out.shape == (3, 16, 64)
    torch.testing.assert_close(out, reference_resampler(r, x), atol=ATOL, rtol=ATOL)
    assert isinstance(r.kv_proj, torch.nn.Linear) == (kv_dim != 64)


def test_resampler_state_dict_names():
    r = Resampler(ResamplerConfig(grid_size=4, embed_dim=64, num_heads=4, kv_dim=128))
    assert set(r.state_dict()) == {
        "pos_embed", "query", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias"}
    assert not r.pos_embed.requires_grad


def test_visual_attention_uses_qwen_per_head_qkv_layout():
    torch.manual_seed(0)
    attn = VisualAttention(width=32, heads=4)
    x = torch.randn(2, 9, 32)
    d = 8
    mixed = x @ attn.in_proj.weight.T + attn.in_proj.bias  # (2, 9, 96): per head [q_h | k_h | v_h]
    heads = []
    for h in range(4):
        block = mixed[..., h * 3 * d:(h + 1) * 3 * d]
        q, k, v = block[..., :d], block[..., d:2 * d], block[..., 2 * d:]
        heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v)
    expected = torch.cat(heads, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
    torch.testing.assert_close(attn(x), expected, atol=ATOL, rtol=ATOL)


def test_vit_forward_and_names():
    torch.manual_seed(0)
    config = tiny_config().vision
    vit = VisionTransformer(config)
    names = set(vit.state_dict())
    for name in ("conv1.weight", "positional_embedding", "ln_pre.weight", "transformer.resblocks.1.ln_1.weight",
                 "transformer.resblocks.0.attn.in_proj.weight", "transformer.resblocks.0.attn.out_proj.bias",
                 "transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_proj.bias",
                 "transformer.resblocks.0.ln_2.bias", "attn_pool.query", "attn_pool.kv_proj.weight",
                 "ln_post.weight", "proj"):
        assert name in names, name
    assert "conv1.bias" not in names
    images = torch.randn(2, 3, 112, 112)
    out = vit(images)
    assert out.shape == (2, 64, config.output_dim)
    # written-out forward: patches row-major + resized positions, pre-norm blocks, pool, ln_post, proj
    x = F.conv2d(images, vit.conv1.weight, stride=14).flatten(2).transpose(1, 2)
    x = vit.ln_pre(x + resize_pos_embed(vit.positional_embedding, 64))
    for block in vit.transformer.resblocks:
        x = x + block.attn(block.ln_1(x))
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x))))
    expected = vit.ln_post(reference_resampler(vit.attn_pool, x)) @ vit.proj
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    assert vit.attn_pool.attn.num_heads == 1 and vit.ln_pre.eps == 1e-6
