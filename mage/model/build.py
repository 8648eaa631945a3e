"""build_model: a SeedXModel from a preset name, on any device (meta included) and dtype."""
from __future__ import annotations

import importlib.util

import torch

from .config import SeedXConfig, get_config
from .seedx import SeedXModel

DEFAULT_DTYPES = {"tiny": torch.float32, "seed-x-13b": torch.bfloat16}


def default_attn_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash_attention_2 where it can run (installed, CUDA, half precision), PyTorch SDPA otherwise."""
    if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return "sdpa"


def build_model(
    name: str = "tiny",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer=None,
    *,
    config: SeedXConfig | None = None,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool | None = None,
    lm_loss_weight: float | None = None,
    rec_loss_weight: float | None = None,
) -> SeedXModel:
    """Build SEED-X with random weights (load real ones with mage.model.checkpoint).

    `tiny` takes its tokenizer (and vocabulary size) from mage.data.tokenizer.build_tokenizer("tiny")
    unless one is passed; `seed-x-13b` has a fixed vocabulary (32330) and keeps `tokenizer` as given
    (None until the real one is loaded). device="meta" builds the whole tree without memory.
    """
    config = config if config is not None else get_config(name)
    changes = {key: value for key, value in (("gradient_checkpointing", gradient_checkpointing),
                                             ("lm_loss_weight", lm_loss_weight),
                                             ("rec_loss_weight", rec_loss_weight)) if value is not None}
    config = config.replace(**changes)
    if tokenizer is None and config.llm.vocab_size is None:
        from mage.data.tokenizer import build_tokenizer
        tokenizer = build_tokenizer(config.name)
    device = torch.device(device)
    dtype = dtype if dtype is not None else DEFAULT_DTYPES.get(config.name, torch.float32)
    attn_implementation = attn_implementation or default_attn_implementation(device, dtype)
    with torch.device(device):
        model = SeedXModel(config, tokenizer=tokenizer, attn_implementation=attn_implementation)
    return model.to(dtype=dtype)
