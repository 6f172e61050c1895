"""Experiment tracking: the `Tracker` protocol with noop, jsonl, wandb and composite implementations."""

from sparse_lm.tracking.base import Tracker, to_jsonable
from sparse_lm.tracking.composite import CompositeTracker
from sparse_lm.tracking.config import TrackerConfig, TrackerKind, WandbMode
from sparse_lm.tracking.factory import make_tracker
from sparse_lm.tracking.jsonl import JsonlTracker, read_metrics
from sparse_lm.tracking.noop import NoopTracker
from sparse_lm.tracking.wandb import WandbTracker  # wandb itself is imported only when one is built

__all__ = [
    "CompositeTracker",
    "JsonlTracker",
    "NoopTracker",
    "Tracker",
    "TrackerConfig",
    "TrackerKind",
    "WandbMode",
    "WandbTracker",
    "make_tracker",
    "read_metrics",
    "to_jsonable",
]
