"""Command line: ``[torchrun ...] train.py [--config PRESET|FILE] [--set SECTION.FIELD=VALUE] [--SECTION.FIELD V]``."""
from __future__ import annotations

import sys

from mage.data.readers import DataError
from mage.trainer.checkpoint import CheckpointError
from mage.trainer.config import ConfigError, load_config, parse_cli
from mage.trainer.distributed import init_distributed, shutdown_distributed

# Errors whose message tells the user what to change: on the command line they end the run without a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the configured sequence; returns the matrix and metrics (on every rank).

    Called without ``argv`` (the command line), configuration, data and checkpoint errors exit with
    their message; called with ``argv`` (from Python) they are raised.
    """
    from_cli = argv is None
    try:
        preset, overrides = parse_cli(sys.argv[1:] if from_cli else argv)
        cfg = load_config(preset, overrides)
        info = init_distributed(cfg.train.device)
        try:
            from mage.trainer.loop import run_sequence

            return run_sequence(cfg, info)
        finally:
            shutdown_distributed()
    except USER_ERRORS as e:
        if from_cli:
            raise SystemExit(f"error: {e}") from None
        raise
