"""A tracker writing plain files into the run directory; the figure scripts read these, never W&B."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparse_lm.tracking.base import FinishOnExit, to_jsonable, to_scalar
from sparse_lm.utils.io import atomic_write_json

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ARTIFACTS_FILE = "artifacts.jsonl"
CONFIG_FILE = "config.json"

# Keys every metrics.jsonl line carries besides the logged metrics.
STEP_KEY = "step"
WALL_TIME_KEY = "wall_time"


class JsonlTracker(FinishOnExit):
    """Appends to `<run_dir>/metrics.jsonl` and `artifacts.jsonl`; keeps `summary.json` up to date.

    - metrics.jsonl: one object per `log` call, `{"step": int, "wall_time": unix seconds, **metrics}`,
      flushed per line so a crash loses nothing already logged.
    - summary.json: the merge of every `log_summary` call, rewritten atomically each time.
    - artifacts.jsonl: one object per `log_artifact` call, `{"name", "kind", "path", "bytes", "wall_time"}`;
      `path` is relative to the run directory when the file lies inside it. Files are listed, not copied.
    - config.json: the run configuration, when one is given.

    Reopening an existing run directory appends to its files (dropping a line torn by a crash), continues
    its step count and merges into its summary.
    Non-finite floats are written as NaN/Infinity (readable by Python's json and pandas).
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.summary_path = self.run_dir / SUMMARY_FILE
        self.artifacts_path = self.run_dir / ARTIFACTS_FILE
        if config is not None:
            atomic_write_json(self.run_dir / CONFIG_FILE, to_jsonable(config))
        self._summary: dict[str, Any] = {}
        if self.summary_path.exists():
            self._summary = json.loads(self.summary_path.read_text())
        self._last_step = _repair_and_last_step(self.metrics_path)
        self._metrics_file = self.metrics_path.open("a", encoding="utf-8")
        self._artifacts_file = self.artifacts_path.open("a", encoding="utf-8")
        self._finished = False

    def log(self, metrics: Mapping[str, float | int], step: int | None = None) -> None:
        self._check_open()
        reserved = {STEP_KEY, WALL_TIME_KEY} & set(metrics)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are reserved by {METRICS_FILE}")
        step = self._last_step + 1 if step is None else int(step)
        record = {STEP_KEY: step, WALL_TIME_KEY: time.time()}
        record.update({str(k): to_scalar(k, v) for k, v in metrics.items()})
        _write_line(self._metrics_file, record)
        self._last_step = step

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        self._check_open()
        self._summary.update(to_jsonable(dict(metrics)))
        atomic_write_json(self.summary_path, self._summary)

    def log_artifact(self, path: str | Path, name: str | None = None, kind: str = "file") -> None:
        self._check_open()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        resolved = path.resolve()
        try:
            stored = str(resolved.relative_to(self.run_dir.resolve()))
        except ValueError:
            stored = str(resolved)
        if resolved.is_dir():
            size = sum(f.stat().st_size for f in resolved.rglob("*") if f.is_file())
        else:
            size = resolved.stat().st_size
        record = {"name": name or path.name, "kind": kind, "path": stored, "bytes": size}
        record[WALL_TIME_KEY] = time.time()
        _write_line(self._artifacts_file, record)

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._metrics_file.close()
        self._artifacts_file.close()

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"JsonlTracker({self.run_dir}) is finished")


def _write_line(file, record: Mapping[str, Any]) -> None:
    file.write(json.dumps(record, sort_keys=False) + "\n")
    file.flush()


def _repair_and_last_step(metrics_path: Path) -> int:
    """Drops a line torn by a crash from an existing metrics file; returns the last step logged, or -1."""
    if not metrics_path.exists():
        return -1
    data = metrics_path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with metrics_path.open("r+b") as f:
            f.truncate(len(complete))
    lines = complete.splitlines()
    return int(json.loads(lines[-1])[STEP_KEY]) if lines else -1


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `<run_dir>/metrics.jsonl`, in the order logged (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    with path.open(encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the process died mid-write
            raise ValueError(f"{path}:{i + 1} is not valid JSON") from None
    return records
