"""Tracker configuration: which tracker a run logs to, and the W&B run fields."""

from __future__ import annotations

import dataclasses
import enum

from sparse_lm.utils.config import coerce_enums


class TrackerKind(enum.StrEnum):
    """Where metrics go (member names equal their values: OmegaConf validates enums by name).

    `wandb` also writes the jsonl files into the run directory, so no figure depends on a W&B server.
    """

    noop = "noop"  # nothing recorded
    jsonl = "jsonl"  # metrics.jsonl, summary.json, artifacts.jsonl in the run directory
    wandb = "wandb"  # jsonl + Weights & Biases


class WandbMode(enum.StrEnum):
    """W&B run mode. Offline by default: online without a network blocks for minutes before failing."""

    offline = "offline"  # written under <run_dir>/wandb; upload later with `wandb sync`
    online = "online"
    disabled = "disabled"  # W&B calls become no-ops (the jsonl files are still written)


@dataclasses.dataclass(frozen=True)
class TrackerConfig:
    """Schema of `conf/tracker/*.yaml`.

    Attributes:
      kind: which tracker; see `TrackerKind`.
      project, entity, mode, tags, group: W&B run fields, used only when `kind` is `wandb`.
    """

    kind: TrackerKind = TrackerKind.jsonl
    project: str = "sparse_lm"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline
    tags: tuple[str, ...] = ()
    group: str | None = None

    def __post_init__(self):
        coerce_enums(self, "tracker", {"kind": TrackerKind, "mode": WandbMode})
        if not isinstance(self.project, str) or not self.project.strip():
            raise ValueError(f"tracker.project must be a non-empty string, got {self.project!r}")
        for field in ("entity", "group"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"tracker.{field} must be null or a non-empty string, got {value!r}")
        # A bare string would iterate into one-letter tags.
        if isinstance(self.tags, str) or not isinstance(self.tags, list | tuple):
            raise ValueError(f"tracker.tags must be a list of strings, got {self.tags!r}")
        tags = tuple(self.tags)
        bad = [t for t in tags if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"tracker.tags must be non-empty strings, got {bad!r}")
        object.__setattr__(self, "tags", tags)

    def replace(self, **changes) -> TrackerConfig:
        return dataclasses.replace(self, **changes)
