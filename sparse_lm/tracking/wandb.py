"""Weights & Biases tracker: the only module of the library that imports wandb, and only when built."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sparse_lm.tracking.base import to_jsonable, to_scalar
from sparse_lm.tracking.config import WandbMode

_ARTIFACT_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


class WandbTracker:
    """Logs to a W&B run whose local files live under `<run_dir>/wandb`.

    Offline by default: offline runs need no account or network and upload later with
    `wandb sync <run_dir>/wandb/offline-run-*`. Use `WandbMode.disabled` to turn every call into a no-op.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        project: str = "sparse_lm",
        entity: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        group: str | None = None,
        mode: WandbMode | str = WandbMode.offline,
        config: Mapping[str, Any] | None = None,
    ):
        import wandb  # imported here so that importing sparse_lm never pulls in wandb

        self._wandb = wandb
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            tags=list(tags),
            group=group,
            mode=WandbMode(mode).value,
            dir=str(self.run_dir),
            config=to_jsonable(dict(config)) if config is not None else None,
        )
        self._finished = False

    def log(self, metrics: Mapping[str, float | int], step: int | None = None) -> None:
        self.run.log({str(k): to_scalar(k, v) for k, v in metrics.items()}, step=step)

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        self.run.summary.update(to_jsonable(dict(metrics)))

    def log_artifact(self, path: str | Path, name: str | None = None, kind: str = "file") -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        # W&B artifact names allow only letters, digits, '-', '_' and '.'.
        artifact = self._wandb.Artifact(_ARTIFACT_NAME_BAD_CHARS.sub("_", name or path.name), type=kind)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        self.run.finish(exit_code=exit_code)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Marks the W&B run failed rather than finished when the block raised.
        self.finish(exit_code=None if exc_type is None else 1)
