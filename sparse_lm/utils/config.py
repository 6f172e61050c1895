"""Helpers for the frozen config dataclasses: enum fields arrive from Hydra as strings and are normalised."""

from __future__ import annotations

import enum
from typing import Any


def coerce_enums(config: Any, prefix: str, fields: dict[str, type[enum.Enum]]) -> None:
    """Replaces each named field of the frozen dataclass `config` by its enum member.

    Raises:
      ValueError naming `<prefix>.<field>`, the bad value and the choices.
    """
    for field, kind in fields.items():
        value = getattr(config, field)
        try:
            object.__setattr__(config, field, kind(value))
        except ValueError:
            choices = ", ".join(member.value for member in kind)
            key = f"{prefix}.{field}" if prefix else field
            raise ValueError(f"{key}={value!r} is not one of: {choices}") from None
