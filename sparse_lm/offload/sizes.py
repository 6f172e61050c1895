"""Memory sizes as people write them in configs: "8GiB", "512 MB", "1e9" (bytes), or "25%" of a whole."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z%]*)\s*")


def parse_size(text: str | int | float, whole: int | None = None, *, key: str = "size") -> int:
    """Bytes from a size string; a percentage is of `whole` bytes (when given).

    Args:
      text: "8GiB", "512MB", "1e9", 4096, or "25%".
      whole: what a percentage is a share of (bytes); percentages are refused when None.
      key: the config key, named in errors.

    Returns:
      The size in bytes, rounded down.
    """
    if isinstance(text, bool):
        raise ValueError(f"{key}={text!r} is not a size")
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        match = _SIZE.fullmatch(str(text))
        if match is None:
            raise ValueError(f"{key}={text!r} is not a size (write e.g. 8GiB, 512MB, 1e9 or 25%)")
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if whole is None:
            raise ValueError(f"{key}={text!r}: a percentage needs something to be a share of")
        if not 0 <= value <= 100:
            raise ValueError(f"{key}={text!r}: a percentage must be in [0, 100]")
        return int(value / 100 * whole)
    if unit not in _UNITS:
        raise ValueError(f"{key}={text!r}: unknown unit {unit!r} (one of {', '.join(u for u in _UNITS if u)}, %)")
    if value < 0:
        raise ValueError(f"{key}={text!r} must not be negative")
    return int(value * _UNITS[unit])
