"""The figure registry and the helpers every figure module in analysis/ shares: saving, tables, series."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

DrawFn = Callable[[dict[str, Any], Path], list[Path]]
FIGURES: dict[str, DrawFn] = {}


def register(name: str) -> Callable[[DrawFn], DrawFn]:
    """Registers a drawing function for the result `name` and for `name_*` / `name-*` variants of it."""

    def decorator(draw: DrawFn) -> DrawFn:
        if name in FIGURES:
            raise ValueError(f"a figure for {name!r} is already registered")
        FIGURES[name] = draw
        return draw

    return decorator


def find_figure(result_name: str) -> DrawFn | None:
    """The drawing function registered for `result_name`, or for the longest registered prefix of it."""
    for name in sorted(FIGURES, key=len, reverse=True):
        if result_name == name or result_name.startswith((f"{name}_", f"{name}-")):
            return FIGURES[name]
    return None


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Writes `fig` as `<stem>.png` and `<stem>.pdf`, without timestamps so reruns give identical files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
    fig.savefig(png, dpi=150, metadata={"Software": None})
    fig.savefig(pdf, metadata={"CreationDate": None})
    return [png, pdf]


def table(result: dict[str, Any], title_start: str) -> dict[str, Any]:
    """The result's table whose title starts with `title_start`."""
    for candidate in result.get("tables", []):
        if candidate["title"].startswith(title_start):
            return candidate
    raise KeyError(f"result {result['name']!r} has no table titled {title_start!r}...")


def columns(tab: dict[str, Any]) -> dict[str, list]:
    """Column name -> list of cells, for a table or a series (`{"columns": [...], "rows": [[...], ...]}`)."""
    return {name: [row[i] for row in tab["rows"]] for i, name in enumerate(tab["columns"])}


def series(result: dict[str, Any], key: str, required: Sequence[str] = ()) -> dict[str, list]:
    """Columns of the result's `series[key]` (figure-only data such as training curves).

    Raises:
      ValueError: naming the result and the series, if the series or one of the `required` columns is missing.
    """
    data = (result.get("series") or {}).get(key)
    if data is None:
        raise ValueError(f"result {result['name']!r} has no {key!r} series, which its figure needs")
    cols = columns(data)
    missing = [name for name in required if name not in cols]
    if missing:
        raise ValueError(f"result {result['name']!r}: the {key!r} series lacks columns {missing}")
    return cols
