"""Figures of kernel benchmarks: the sparse FFN against the dense one, by active fraction (bench_ffn_* results)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from figure_registry import columns, register, save, table
from figures_train import finite, floats
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from sparse_lm.utils.machine import describe_machine

FFN_TABLE = "Time per FFN layer and speedup by active fraction"
IMPLEMENTATION_SUFFIXES = ("_ms", "_speedup", "_gb_per_s")
# (label, colour, marker) per implementation; the colours stay the same across figures
IMPLEMENTATION_STYLES = {
    "ffi": ("C++ twin (jax.ffi)", "tab:blue", "o"),
    "xla": ("XLA gather + dot", "tab:orange", "s"),
    "pallas": ("Pallas", "tab:green", "^"),
}
ANNOTATED = "ffi"  # the implementation whose speedups are written beside its points
FLOOR_LABEL = "bandwidth floor (dense bytes / sparse bytes)"
READ_BANDWIDTH_LABEL = "read bandwidth measured in the same run"
DENSE_LABEL = "dense FFN"
PRECISION = "f32"  # bench_ffn times f32 weights only
HEADROOM = 1.3  # bandwidth panel: y range over its highest line, the top for the legend
PLAIN_NUMBERS = FuncFormatter(lambda x, _: f"{x:g}")


def implementations(column_names: Sequence[str]) -> list[str]:
    """The implementations timed in a bench_ffn table, in column order: each `<impl>` with all of the `<impl>_ms`,
    `<impl>_speedup` and `<impl>_gb_per_s` columns (the dense baseline has only `dense_ms`)."""
    names = set(column_names)
    found = []
    for name in column_names:
        if name.endswith("_ms"):
            impl = name.removesuffix("_ms")
            if all(f"{impl}{suffix}" in names for suffix in IMPLEMENTATION_SUFFIXES):
                found.append(impl)
    return found


def _style(impl: str, index: int) -> tuple[str, str, str]:
    """(label, colour, marker) of an implementation; unknown ones get their name and a colour of their own."""
    return IMPLEMENTATION_STYLES.get(impl, (impl, f"C{(index + 3) % 10}", "D"))


def _fraction_axis(ax: Axes, fractions: np.ndarray) -> None:
    """Log-scale active fraction, ticked at the measured fractions only, as percentages."""
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{100 * f:g}%" for f in fractions])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.margins(x=0.08)  # room for the speedup labels left of the first point
    ax.set_xlabel("active fraction of the FFN's neurons (log scale)")
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _speedup_panel(ax: Axes, data: dict[str, np.ndarray], impls: list[str]) -> None:
    """(a) dense time / sparse time per implementation, beside the bandwidth floor and the dense line at 1."""
    fractions = data["fraction"]
    for i, impl in enumerate(impls):
        label, color, marker = _style(impl, i)
        ax.plot(fractions, data[f"{impl}_speedup"], color=color, marker=marker, ms=5, lw=1.5, label=label)
    ax.plot(fractions, data["floor_speedup"], color="0.35", ls="--", lw=1.2, label=FLOOR_LABEL)
    ax.axhline(1, color="0.5", lw=1, label="dense")
    if ANNOTATED in impls:
        _, color, _ = _style(ANNOTATED, impls.index(ANNOTATED))
        for fraction, speedup in zip(fractions, data[f"{ANNOTATED}_speedup"], strict=True):
            if np.isfinite(speedup):
                # below-left of the point: above it sits the floor, which the C++ twin nearly reaches
                ax.annotate(f"{speedup:.3g}x", (fraction, speedup), textcoords="offset points", xytext=(-5, -4),
                            ha="right", va="top", fontsize=8, color=color)
    _fraction_axis(ax, fractions)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(PLAIN_NUMBERS)
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("speedup over the dense FFN (log scale, higher is better)")
    ax.set_title("(a) speedup over dense (dense time / sparse time)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)


def _bandwidth_panel(ax: Axes, data: dict[str, np.ndarray], impls: list[str], metrics: dict[str, Any]) -> None:
    """(b) bytes each sparse path must read / its time, under the read bandwidth and beside the dense FFN's."""
    fractions = data["fraction"]
    for i, impl in enumerate(impls):
        label, color, marker = _style(impl, i)
        ax.plot(fractions, data[f"{impl}_gb_per_s"], color=color, marker=marker, ms=5, lw=1.5, label=label)
    if finite(metrics.get("read_bandwidth_gb_per_s")):
        ax.axhline(metrics["read_bandwidth_gb_per_s"], color="tab:red", ls="--", lw=1.2, label=READ_BANDWIDTH_LABEL)
    if finite(metrics.get("dense_gb_per_s")):
        ax.axhline(metrics["dense_gb_per_s"], color="0.3", ls=":", lw=1.5, label=DENSE_LABEL)
    _fraction_axis(ax, fractions)
    drawn = np.concatenate([line.get_ydata() for line in ax.get_lines()]).astype(float)
    top = np.nanmax(drawn, initial=0.0)
    # headroom over the highest line (usually the read bandwidth) keeps the legend off the data
    ax.set_ylim(0, HEADROOM * top if top > 0 else None)
    ax.set_ylabel("achieved bandwidth (GB/s: bytes read / time)")
    ax.set_title("(b) achieved bandwidth", fontsize=10)
    ax.legend(loc="upper left", ncol=2, fontsize=8)


def bench_ffn_figure(result: dict[str, Any]) -> Figure:
    """Two panels against the active fraction: (a) each sparse implementation's speedup over the dense FFN with the
    bandwidth floor, (b) the bandwidth each achieves against the machine's read bandwidth and the dense FFN's.

    Raises:
      KeyError: if the result has no FFN timing table.
      ValueError: naming the result, if the table lacks the fraction or floor column or any implementation.
    """
    metrics, name = result["metrics"], result["name"]
    cols = columns(table(result, FFN_TABLE))
    missing = [column for column in ("fraction", "floor_speedup") if column not in cols]
    if missing:
        raise ValueError(f"result {name!r}: the FFN timing table lacks columns {missing}")
    impls = implementations(list(cols))
    if not impls:
        raise ValueError(f"result {name!r}: the FFN timing table has no implementation columns "
                         "(<impl>_ms, <impl>_speedup, <impl>_gb_per_s)")
    data = {column: floats(values) for column, values in cols.items()}
    order = np.argsort(data["fraction"], kind="stable")  # lines run left to right whatever the row order
    data = {column: values[order] for column, values in data.items()}

    fig = Figure(figsize=(13, 5), layout="constrained")
    speedup_ax, bandwidth_ax = fig.subplots(1, 2)
    _speedup_panel(speedup_ax, data, impls)
    _bandwidth_panel(bandwidth_ax, data, impls, metrics)

    shape = metrics.get("shape", name)
    size = (f" (d {metrics['d_model']}, d_ff {metrics['d_ff']})"
            if finite(metrics.get("d_model")) and finite(metrics.get("d_ff")) else "")
    fig.suptitle(f"Sparse FFN against dense: {shape} layer{size}, one token, {PRECISION}")
    if result.get("machine"):
        fig.supxlabel(describe_machine(result["machine"]), fontsize=7, color="0.4")
    return fig


@register("bench_ffn")
def draw_bench_ffn(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Speedup over dense and achieved bandwidth of the sparse FFN implementations by active fraction."""
    return save(bench_ffn_figure(result), out_dir, result["name"])
