"""Measured results: one small JSON file per result in `results/`, rendered into `docs/RESULTS.md`.

Usage: `python -m sparse_lm.results render [--results-dir results] [--out docs/RESULTS.md]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sparse_lm.tracking.base import to_jsonable
from sparse_lm.utils.io import atomic_write_text
from sparse_lm.utils.machine import describe_machine, machine_info

RESULTS_DIR = "results"
RESULTS_DOC = "docs/RESULTS.md"
RENDER_COMMAND = "python -m sparse_lm.results render"
FIGURES_COMMAND = "python analysis/make_figures.py"
REQUIRED_KEYS = ("name", "title", "date", "command", "metrics", "machine")

_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]+")
Scalar = int | float | str | bool | None


# ------------------------------------------------------------------------------------------------ writing


def write_result(
    name: str,
    metrics: Mapping[str, Any],
    *,
    command: str,
    title: str,
    notes: str = "",
    tables: Sequence[Mapping[str, Any]] | None = None,
    series: Mapping[str, Mapping[str, Any]] | None = None,
    results_dir: str | Path = RESULTS_DIR,
    machine: Mapping[str, Any] | None = None,
) -> Path:
    """Writes `<results_dir>/<name>.json` atomically, replacing an earlier result of that name.

    Args:
      name: file stem: letters, digits, '_' and '-' only. Figures are matched to results by this name.
      metrics: flat mapping of metric name to number or string (numpy/JAX scalars are converted).
      command: the exact command line that produced the numbers (see `current_command`).
      title: section title in docs/RESULTS.md.
      notes: free Markdown shown under the numbers.
      tables: optional `{"title": str, "columns": [str, ...], "rows": [[cell, ...], ...]}` tables.
      series: optional named `{"columns": [...], "rows": [...]}` data for figures only (e.g. training
        curves): kept in the file, not rendered as tables.
      results_dir: folder of result files.
      machine: the machine description; defaults to `machine_info()` of this process.

    Returns:
      The path written.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"result name {name!r} must be a file stem of letters, digits, '_' and '-'")
    for field, value in (("title", title), ("command", command)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"result {name!r}: {field} must be a non-empty string, got {value!r}")
    if not isinstance(notes, str):
        raise ValueError(f"result {name!r}: notes must be a string, got {type(notes).__name__}")
    record = {
        "name": name,
        "title": title,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "metrics": _check_metrics(name, metrics),
        "tables": [_check_table(name, i, table) for i, table in enumerate(tables or ())],
        "series": {
            str(key): {k: v for k, v in _check_table(name, key, {"title": key, **value}).items() if k != "title"}
            for key, value in (series or {}).items()
        },
        "notes": notes,
        "machine": to_jsonable(dict(machine) if machine is not None else machine_info()),
    }
    # Keys keep the author's order (metrics read best in the order they were measured).
    return atomic_write_text(Path(results_dir) / f"{name}.json", json.dumps(record, indent=2) + "\n")


def current_command() -> str:
    """This process's command line, shell-quoted, with the interpreter path shortened to `python`."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if Path(argv[0]).name.startswith("python"):
        argv[0] = "python"
    return shlex.join(argv)


def _check_metrics(name: str, metrics: Mapping[str, Any]) -> dict[str, Scalar]:
    if not isinstance(metrics, Mapping):
        raise ValueError(f"result {name!r}: metrics must be a mapping, got {type(metrics).__name__}")
    checked = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"result {name!r}: metric names must be non-empty strings, got {key!r}")
        checked[key] = _check_scalar(f"result {name!r}: metric {key!r}", value)
    return checked


def _check_table(name: str, index: int, table: Mapping[str, Any]) -> dict[str, Any]:
    where = f"result {name!r}: tables[{index}]"
    if not isinstance(table, Mapping) or set(table) != {"title", "columns", "rows"}:
        keys = sorted(table) if isinstance(table, Mapping) else type(table).__name__
        raise ValueError(f"{where} must have exactly the keys title, columns, rows; got {keys}")
    columns = [str(column) for column in table["columns"]]
    rows = []
    for r, row in enumerate(table["rows"]):
        if isinstance(row, str | bytes) or len(row) != len(columns):
            raise ValueError(
                f"{where}.rows[{r}] must have {len(columns)} cells (one per column), got {row!r}"
            )
        rows.append([_check_scalar(f"{where}.rows[{r}]", cell) for cell in row])
    return {"title": str(table["title"]), "columns": columns, "rows": rows}


def _check_scalar(where: str, value: Any) -> Scalar:
    plain = to_jsonable(value)
    if plain is not None and not isinstance(plain, int | float | str | bool):
        raise ValueError(f"{where} must be a number or a string, got {type(value).__name__}: {value!r}")
    return plain


# ------------------------------------------------------------------------------------------------ reading


def load_result(path: str | Path) -> dict[str, Any]:
    """One result file, checked for the keys rendering needs; errors name the file."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(result, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(result).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in result]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    if result["name"] != path.stem:
        raise ValueError(f"{path}: name {result['name']!r} does not match the file name")
    if not isinstance(result["metrics"], dict):
        raise ValueError(f"{path}: metrics must be an object")
    result.setdefault("tables", [])
    result.setdefault("series", {})
    result.setdefault("notes", "")
    return result


def load_results(results_dir: str | Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every `*.json` result in `results_dir`, sorted by name."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist")
    return [load_result(path) for path in sorted(results_dir.glob("*.json"))]


# ------------------------------------------------------------------------------------------------ rendering


def render(
    results_dir: str | Path = RESULTS_DIR,
    out: str | Path = RESULTS_DOC,
    figures_dir: str | Path | None = None,
) -> Path:
    """Writes the Markdown report of every result in `results_dir` to `out` (atomically).

    Figures are the `<figures_dir>/<name>*.png` files (default: `figures/` beside `out`); each goes to the
    result with the longest name it starts with, followed by the end of the stem, '_' or '-'.
    """
    out = Path(out)
    results = load_results(results_dir)
    figures_dir = Path(figures_dir) if figures_dir is not None else out.parent / "figures"
    figures = _match_figures([r["name"] for r in results], figures_dir)
    links = {
        name: [Path(os.path.relpath(png, out.parent)).as_posix() for png in pngs]
        for name, pngs in figures.items()
    }
    return atomic_write_text(out, render_markdown(results, links, results_dir=Path(results_dir).as_posix()))


def render_markdown(
    results: Sequence[Mapping[str, Any]],
    figure_links: Mapping[str, Sequence[str]] | None = None,
    results_dir: str = RESULTS_DIR,
) -> str:
    """The report as Markdown: a header, a contents table, then one section per result in the given order."""
    figure_links = figure_links or {}
    lines = [
        "# Results",
        "",
        f"<!-- Generated by `{RENDER_COMMAND}` from {results_dir}/*.json. Do not edit by hand. -->",
        "",
        f"Generated by `{RENDER_COMMAND}` from the JSON files in `{results_dir}/`; do not edit by hand.",
        "To update a result, rerun the command shown in its section, then regenerate this page and the",
        f"figures (`{FIGURES_COMMAND}`).",
        "",
    ]
    if not results:
        return "\n".join([*lines, "No results yet.", ""])
    lines += _markdown_table(
        ["Result", "Measured"],
        [[f"[{_inline(r['title'])}](#{r['name']})", _date(r["date"])] for r in results],
    )
    for result in results:
        lines += [""] + _section(result, figure_links.get(result["name"], ()))
    return "\n".join(lines) + "\n"


def _section(result: Mapping[str, Any], figure_links: Sequence[str]) -> list[str]:
    command = str(result["command"])
    fence = "````" if "```" in command else "```"
    lines = [
        f'<a id="{result["name"]}"></a>',
        "",
        f"## {_inline(result['title'])}",
        "",
        f"`{result['name']}` · measured {result['date']}",
        "",
        f"Machine: {_inline(describe_machine(result['machine']))}",
        "",
        f"{fence}bash",
        command,
        fence,
    ]
    if result["metrics"]:
        rows = [[f"`{key}`", format_value(value)] for key, value in result["metrics"].items()]
        lines += [""] + _markdown_table(["Metric", "Value"], rows, right_align=[False, True])
    for table in result.get("tables") or ():
        rows = [[format_value(cell) for cell in row] for row in table["rows"]]
        numeric = [all(_is_number(row[c]) for row in table["rows"]) for c in range(len(table["columns"]))]
        lines += ["", f"**{_inline(table['title'])}**", ""]
        lines += _markdown_table([_inline(c) for c in table["columns"]], rows, right_align=numeric)
    if result.get("notes", "").strip():
        lines += ["", result["notes"].strip()]
    for link in figure_links:
        lines += ["", f"![{_inline(result['title'])}]({link})"]
    return lines


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_align=None) -> list[str]:
    right_align = right_align or [False] * len(header)
    rule = ["---:" if right else "---" for right in right_align]
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits without exponents between 1e-4 and 1e15."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if not math.isfinite(value):
            return str(value)  # nan, inf, -inf
        rounded = float(
            f"{value:.3e}"
        )  # 4 significant digits, so 9999.7 becomes 10000 before choosing a form
        magnitude = math.floor(math.log10(abs(rounded)))
        if -4 <= magnitude < 4:
            return f"{rounded:.4g}"
        if 4 <= magnitude < 15:
            return f"{rounded:.0f}"
        return f"{rounded:.3e}"
    return _inline(str(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _inline(text: str) -> str:
    """Text safe inside a Markdown table cell or heading."""
    return text.replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")


def _date(iso: str) -> str:
    return str(iso)[:10]


def _match_figures(names: Sequence[str], figures_dir: Path) -> dict[str, list[Path]]:
    """PNG figures of each result: `<name>.png`, `<name>_*.png`, `<name>-*.png`, longest name wins."""
    matched: dict[str, list[Path]] = {name: [] for name in names}
    if not figures_dir.is_dir():
        return matched
    by_length = sorted(names, key=len, reverse=True)
    for png in sorted(figures_dir.glob("*.png")):
        for name in by_length:
            if png.stem == name or png.stem.startswith((f"{name}_", f"{name}-")):
                matched[name].append(png)
                break
    return matched


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_lm.results", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render_parser = commands.add_parser("render", help="write docs/RESULTS.md from results/*.json")
    render_parser.add_argument("--results-dir", default=RESULTS_DIR, help="folder of result JSON files")
    render_parser.add_argument("--out", default=RESULTS_DOC, help="Markdown file to write")
    render_parser.add_argument(
        "--figures-dir", default=None, help="PNG figures (default: figures/ beside --out)"
    )
    args = parser.parse_args(argv)
    if args.command == "render":
        out = render(args.results_dir, args.out, args.figures_dir)
        count = len(list(Path(args.results_dir).glob("*.json")))
        print(f"wrote {out} ({count} results)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
