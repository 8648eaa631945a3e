"""The tiny model's windowed resamplers: each image token holds its own part of the image and says where."""
from __future__ import annotations

import pytest
import torch

from mage.model.config import ResamplerConfig, get_config
from mage.model.resampler import Resampler, window_mask


def _readable(mask: torch.Tensor, query: int) -> set[tuple[int, int]]:
    key_grid = int(mask.shape[1] ** 0.5)
    return {divmod(int(k), key_grid) for k in torch.nonzero(mask[query] == 0).flatten()}


def test_window_covers_the_queries_own_cell_and_the_reach_asked_for():
    # 4 x 4 queries over 8 x 8 keys: half a cell is the query's own 2 x 2 keys; one cell adds a ring.
    assert _readable(window_mask(4, 64, 0.5), 5) == {(r, c) for r in (2, 3) for c in (2, 3)}
    assert _readable(window_mask(4, 64, 1.0), 5) == {(r, c) for r in range(1, 5) for c in range(1, 5)}
    assert _readable(window_mask(4, 64, 1.0), 0) == {(r, c) for r in range(3) for c in range(3)}  # clipped
    # 8 x 8 queries over 8 x 8 keys (the ViT's attention pool): its own key and the eight around it.
    assert _readable(window_mask(8, 64, 1.0), 9) == {(r, c) for r in range(3) for c in range(3)}
    assert torch.isneginf(window_mask(4, 64, 0.5)).sum() == 16 * (64 - 4)
    with pytest.raises(ValueError, match="square grid"):
        window_mask(4, 60, 1.0)


def _influence(resampler: Resampler, query: int) -> torch.Tensor:
    """|d out[query] / d x[key]| for every key: how much the query reads each key."""
    x = torch.randn(1, 64, resampler.kv_dim, requires_grad=True)
    resampler(x)[0, query].sum().backward()
    return x.grad[0].norm(dim=-1)


@pytest.mark.parametrize("window", [0.0, 0.5])
def test_a_windowed_query_reads_its_own_region_only(window):
    torch.manual_seed(0)
    r = Resampler(ResamplerConfig(grid_size=4, embed_dim=32, num_heads=4, kv_dim=24, window=window))
    influence = _influence(r, query=5)
    own = [2 * 8 + 2, 2 * 8 + 3, 3 * 8 + 2, 3 * 8 + 3]
    if window:
        assert (influence[own] > 0).all() and influence.sum() == influence[own].sum()
    else:  # Qwen-VL's resampler reads the whole image
        assert (influence > 0).all()


def test_output_norm_and_positions():
    torch.manual_seed(0)
    cfg = ResamplerConfig(grid_size=4, embed_dim=32, num_heads=4, kv_dim=24)
    plain = Resampler(cfg)
    both = Resampler(ResamplerConfig(**{**cfg.__dict__, "output_norm": True, "output_positions": True}))
    both.load_state_dict(plain.state_dict(), strict=False)
    x = 50 * torch.randn(2, 64, 24)
    normed = torch.nn.functional.layer_norm(plain(x), (32,), eps=cfg.layer_norm_eps)
    torch.testing.assert_close(both(x) - plain.pos_embed, normed)


def test_only_the_tiny_model_is_windowed():
    tiny, real = get_config("tiny"), get_config("seed-x-13b")
    assert tiny.vision.pool_window > 0 and tiny.input_resampler.window > 0
    assert tiny.input_resampler.output_positions and tiny.input_resampler.output_norm
    # SEED-X's resamplers stay Qwen-VL's, so its released weights compute what they were trained to.
    assert real.vision.pool_window == 0 and real.input_resampler.window == 0
    for r in (real.input_resampler, real.output_resampler, tiny.output_resampler):
        assert r.window == 0 and not r.output_positions and not r.output_norm  # LLM states have no layout
