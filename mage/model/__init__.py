"""SEED-X: the multimodal LLM that MAGE trains (tiny CPU preset and the real 13B sizes)."""
from .build import build_model
from .checkpoint import CheckpointError, load_seed_x
from .config import LLMConfig, ResamplerConfig, SeedXConfig, VisionConfig, get_config, seed_x_13b_config, tiny_config
from .seedx import ModelOutput, SeedXModel

__all__ = [
    "build_model", "load_seed_x", "CheckpointError", "SeedXModel", "ModelOutput",
    "SeedXConfig", "VisionConfig", "ResamplerConfig", "LLMConfig", "get_config", "tiny_config", "seed_x_13b_config",
]
