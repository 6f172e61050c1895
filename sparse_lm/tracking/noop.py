"""A tracker that records nothing: for tests and throwaway runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparse_lm.tracking.base import FinishOnExit


class NoopTracker(FinishOnExit):
    """Accepts every call and keeps nothing."""

    def log(self, metrics: Mapping[str, float | int], step: int | None = None) -> None:
        del metrics, step

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        del metrics

    def log_artifact(self, path: str | Path, name: str | None = None, kind: str = "file") -> None:
        del path, name, kind

    def finish(self) -> None:
        pass
