"""Shared entry-point plumbing: typed config from Hydra's DictConfig, clean errors for bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

# Errors that mean "bad input": reported in one line, exit status 2, no traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, TypeError)


def to_config(cfg: DictConfig) -> Any:
    """The composed config as the library's frozen dataclasses (each validates itself)."""
    return OmegaConf.to_object(cfg)


def run_entry(cfg: DictConfig, task: Callable[[Any, str], dict]) -> dict:
    """Validates `cfg`, runs `task(config, run_dir)` in Hydra's run directory, exits 2 on bad input."""
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
    try:
        config = to_config(cfg)
        return task(config, HydraConfig.get().runtime.output_dir)
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
