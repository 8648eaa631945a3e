"""The continual-learning trainer: config, loop, checkpoints/resume, DDP/DeepSpeed, reports."""
from mage.trainer.config import Config, ConfigError, load_config
from mage.trainer.main import main

__all__ = ["main", "Config", "ConfigError", "load_config"]
