"""The Tracker protocol every experiment logs through, and JSON conversion shared by its implementations."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """Where a run's metrics go: scalars over steps, a final summary, and files worth keeping.

    Implementations: `NoopTracker`, `JsonlTracker` (the run directory, read by the figure scripts),
    `WandbTracker` (Weights & Biases) and `CompositeTracker` (fan-out to several).
    """

    def log(self, metrics: Mapping[str, float | int], step: int | None = None) -> None:
        """Records scalar metrics at `step` (None: the step after the last one logged)."""
        ...

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Merges `metrics` into the run's summary: later calls overwrite earlier keys."""
        ...

    def log_artifact(self, path: str | Path, name: str | None = None, kind: str = "file") -> None:
        """Records an existing file or directory as an output of the run (name defaults to its file name)."""
        ...

    def finish(self) -> None:
        """Flushes and closes; calling it again does nothing."""
        ...


class FinishOnExit:
    """Mixin: `with tracker:` calls `finish()` on the way out, also when the block raises."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish()


def to_jsonable(value: Any) -> Any:
    """Converts numpy/JAX scalars and arrays, enums, paths, dataclasses and tuples into plain JSON values.

    Non-finite floats stay floats (json writes them as NaN/Infinity, which Python and pandas read back):
    a diverged loss is a result worth keeping, not an error.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    # numpy and JAX arrays/scalars, without importing either: both expose tolist().
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return to_jsonable(tolist())
    raise TypeError(f"cannot store a {type(value).__name__} as JSON: {value!r}")


def to_scalar(key: str, value: Any) -> float | int | bool:
    """`value` as a Python number, or TypeError naming `key` (a metric must be a single number)."""
    plain = to_jsonable(value)
    if isinstance(plain, bool | int | float):
        return plain
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}")
