"""A tracker that forwards every call to several trackers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sparse_lm.tracking.base import FinishOnExit, Tracker


class CompositeTracker(FinishOnExit):
    """Fans each call out to `trackers`, in order."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = tuple(trackers)

    def log(self, metrics: Mapping[str, float | int], step: int | None = None) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step=step)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_summary(metrics)

    def log_artifact(self, path: str | Path, name: str | None = None, kind: str = "file") -> None:
        for tracker in self.trackers:
            tracker.log_artifact(path, name=name, kind=kind)

    def finish(self) -> None:
        self._close(lambda tracker: tracker.finish())

    def __exit__(self, exc_type, exc, tb) -> None:
        # Trackers with their own __exit__ (W&B marks a run failed) see the exception too.
        def close(tracker):
            if hasattr(tracker, "__exit__"):
                tracker.__exit__(exc_type, exc, tb)
            else:
                tracker.finish()

        self._close(close)

    def _close(self, close) -> None:
        # Every tracker gets to close even if an earlier one fails; the first error is re-raised.
        error: Exception | None = None
        for tracker in self.trackers:
            try:
                close(tracker)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
