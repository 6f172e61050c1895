"""Builds the tracker a `TrackerConfig` describes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparse_lm.tracking.base import Tracker
from sparse_lm.tracking.composite import CompositeTracker
from sparse_lm.tracking.config import TrackerConfig, TrackerKind
from sparse_lm.tracking.jsonl import JsonlTracker
from sparse_lm.tracking.noop import NoopTracker
from sparse_lm.tracking.wandb import WandbTracker


def make_tracker(
    cfg: TrackerConfig,
    run_dir: str | Path,
    run_config: Mapping[str, Any] | None = None,
    run_name: str | None = None,
) -> Tracker:
    """The tracker for `cfg.kind`, writing under `run_dir`.

    Args:
      cfg: tracker configuration.
      run_dir: the run's output directory (Hydra's run dir in experiments).
      run_config: the run's full configuration, saved as `config.json` (jsonl) and as the W&B run config.
      run_name: W&B run name (None lets W&B pick one).

    Returns:
      `NoopTracker` for `noop`, `JsonlTracker` for `jsonl`, and for `wandb` a `CompositeTracker` of a
      `JsonlTracker` and a `WandbTracker`, so the run directory always holds the metrics figures need.
    """
    if cfg.kind is TrackerKind.noop:
        return NoopTracker()
    jsonl = JsonlTracker(run_dir, config=run_config)
    if cfg.kind is TrackerKind.jsonl:
        return jsonl
    if cfg.kind is TrackerKind.wandb:
        try:
            wandb_tracker = WandbTracker(
                run_dir,
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                tags=cfg.tags,
                group=cfg.group,
                mode=cfg.mode,
                config=run_config,
            )
        except BaseException:
            jsonl.finish()
            raise
        return CompositeTracker([jsonl, wandb_tracker])
    raise AssertionError(f"unhandled tracker.kind {cfg.kind}")
