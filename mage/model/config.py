"""Sizes of the SEED-X graph: the real SEED-X (LLaMA-2-13B + Qwen-VL ViT-G/448) and a tiny CPU copy.

Names and semantics follow SEED-X (docs/DESIGN.md, "Model"); the tiny preset keeps the same graph with small sizes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class ResamplerConfig:
    """One cross-attention layer with grid_size**2 learnable queries (Qwen-VL's Resampler)."""

    grid_size: int
    embed_dim: int
    num_heads: int
    kv_dim: int
    layer_norm_eps: float = 1e-5
    # 0 = Qwen-VL's resampler: every query reads the whole image. > 0 (the tiny model only, docs/METHOD.md
    # "The tiny model"): a query reads only the keys within `window` query cells of its own centre, so
    # each image token holds its own part of the image.
    window: float = 0.0
    # Add the query's fixed position to its output, so the LLM reads where a token is from its content.
    output_positions: bool = False
    # LayerNorm the output (before the positions): image tokens keep a fixed scale instead of drifting to
    # norms of hundreds (the tiny text embeddings': 0.35), in which the positions above would be lost.
    output_norm: bool = False

    @property
    def num_queries(self) -> int:
        return self.grid_size * self.grid_size


@dataclass
class VisionConfig:
    """Qwen-VL ViT with an attention pool; output (num_queries, output_dim) per image view."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    num_queries: int  # queries of the attention pool
    output_dim: int
    pos_embed_rows: int  # rows of `positional_embedding`, bicubically resized to the patch grid
    layer_norm_eps: float = 1e-6
    pool_window: float = 0.0  # the attention pool's `ResamplerConfig.window`

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def pool_heads(self) -> int:
        # Qwen-VL gives the attention pool output_dim // 128 heads.
        return max(1, self.output_dim // 128)


@dataclass
class LLMConfig:
    """LLaMA sizes; vocab_size None means "the tokenizer's length"."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


@dataclass
class SeedXConfig:
    name: str
    vision: VisionConfig
    input_resampler: ResamplerConfig
    output_resampler: ResamplerConfig
    llm: LLMConfig
    pool_stride: int = 4  # ViT tokens averaged into one regression-target token
    lm_loss_weight: float = 1.0
    rec_loss_weight: float = 6.0
    gradient_checkpointing: bool = False
    image_token_format: str = "<img_{:05d}>"
    boi_token: str = "<img>"
    eoi_token: str = "</img>"

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image view, in and out."""
        return self.input_resampler.num_queries

    def validate(self) -> None:
        """Raise ValueError naming the first pair of sizes that do not fit together."""
        v, ir, orr, llm = self.vision, self.input_resampler, self.output_resampler, self.llm
        checks = [
            (v.image_size % v.patch_size == 0, f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}"),
            (_is_square(v.num_patches), f"vision patch count {v.num_patches} must be a square"),
            (_is_square(v.pos_embed_rows), f"vision.pos_embed_rows {v.pos_embed_rows} must be a square"),
            (_is_square(v.num_queries), f"vision.num_queries {v.num_queries} must be a square"),
            (v.width % v.heads == 0, f"vision.width {v.width} not divisible by heads {v.heads}"),
            (v.num_queries % self.pool_stride == 0, f"vision.num_queries {v.num_queries} not divisible by pool_stride {self.pool_stride}"),
            (ir.kv_dim == v.output_dim, f"input_resampler.kv_dim {ir.kv_dim} != vision.output_dim {v.output_dim}"),
            (ir.embed_dim == llm.hidden_size, f"input_resampler.embed_dim {ir.embed_dim} != llm.hidden_size {llm.hidden_size}"),
            (orr.kv_dim == llm.hidden_size, f"output_resampler.kv_dim {orr.kv_dim} != llm.hidden_size {llm.hidden_size}"),
            (orr.embed_dim == v.output_dim, f"output_resampler.embed_dim {orr.embed_dim} != vision.output_dim {v.output_dim}"),
            (orr.num_queries == ir.num_queries, f"output_resampler queries {orr.num_queries} != input_resampler queries {ir.num_queries}"),
            (v.num_queries // self.pool_stride == orr.num_queries,
             f"vision.num_queries / pool_stride = {v.num_queries // self.pool_stride} must equal the output resampler's "
             f"{orr.num_queries} queries (the regression target has one token per generated image token)"),
            (ir.embed_dim % ir.num_heads == 0, f"input_resampler.embed_dim {ir.embed_dim} not divisible by num_heads {ir.num_heads}"),
            (orr.embed_dim % orr.num_heads == 0, f"output_resampler.embed_dim {orr.embed_dim} not divisible by num_heads {orr.num_heads}"),
            (llm.hidden_size % llm.num_heads == 0, f"llm.hidden_size {llm.hidden_size} not divisible by num_heads {llm.num_heads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SeedXConfig {self.name!r}: {message}")

    def replace(self, **changes) -> "SeedXConfig":
        return dataclasses.replace(self, **changes)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def tiny_config() -> SeedXConfig:
    """The tiny SEED-X graph, sized for the CPU benchmark (docs/METHOD.md, "The tiny model").

    Width 128: one group's rank 8 is 1/16 of it and the whole rank-32 LoRA 1/4, so the adapters are a
    low-rank update of a wider layer as in SEED-X (8 / 5120), while a training step stays ~0.15 s on one
    CPU core. A width of 256 would halve that ratio again at twice the step time.
    """
    return SeedXConfig(
        name="tiny",
        vision=VisionConfig(image_size=112, patch_size=14, width=64, layers=2, heads=4, mlp_dim=256,
                            num_queries=64, output_dim=96, pos_embed_rows=16, pool_window=1.0),
        # ViT width 96 != LLM width 128, so both resamplers have their kv projection, as in SEED-X.
        # Local image tokens that say where they are: without them the tiny base, trained for minutes,
        # cannot tell where an object is (docs/METHOD.md "The tiny model", docs/RESULTS_HISTORY.md).
        input_resampler=ResamplerConfig(grid_size=4, embed_dim=128, num_heads=4, kv_dim=96, window=0.5,
                                        output_positions=True, output_norm=True),
        output_resampler=ResamplerConfig(grid_size=4, embed_dim=96, num_heads=4, kv_dim=128),
        llm=LLMConfig(hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, vocab_size=None),
    )


def seed_x_13b_config() -> SeedXConfig:
    """SEED-X as released: LLaMA-2-13B-chat, Qwen-VL ViT-G/448, resamplers of agent_seed_x.yaml."""
    return SeedXConfig(
        name="seed-x-13b",
        vision=VisionConfig(image_size=448, patch_size=14, width=1664, layers=48, heads=16, mlp_dim=8192,
                            num_queries=256, output_dim=4096, pos_embed_rows=256),
        input_resampler=ResamplerConfig(grid_size=8, embed_dim=5120, num_heads=32, kv_dim=4096),
        output_resampler=ResamplerConfig(grid_size=8, embed_dim=4096, num_heads=32, kv_dim=5120),
        llm=LLMConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, vocab_size=32330,
                      max_position_embeddings=2048, rms_norm_eps=1e-5),
    )


PRESETS = {"tiny": tiny_config, "seed-x-13b": seed_x_13b_config}


def get_config(name: str) -> SeedXConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    config.validate()
    return config
