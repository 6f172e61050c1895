"""Figures of benchmarks: the sparse FFN against the dense one by active fraction (bench_ffn_* results), and the
sparse decode engine against dense decode and llama.cpp (bench_sparse_* results)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from figure_registry import columns, register, save, table
from figures_train import count, finite, floats
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
PRECISION = "f32"  # bench_ffn and bench_decode time f32 weights only
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


# ------------------------------------------------------------------------------------------------ bench_sparse

class DecodeBar(NamedTuple):
    metric: str
    tokens_per_s: float
    runs: np.ndarray  # the individual runs; empty when the result lists none
    label: str
    color: str


DENSE_COLOR, SPARSE_COLOR = "0.6", "tab:blue"  # the same in both panels
ORIGINAL_COLOR = "0.85"  # the model before its ReLU-fication
# (metric, its runs, tick label, colour) per decode bar; llama.cpp's is drawn only when the run measured it
DECODE_BARS = (
    ("tokens_per_s_dense", "tokens_per_s_dense_runs", "dense\n(sparse_lm)", DENSE_COLOR),
    ("tokens_per_s_sparse", "tokens_per_s_sparse_runs", "sparse engine\n(sparse_lm)", SPARSE_COLOR),
)
# the decode step with every FFN skipped, when the run measured it: the ceiling of any sparse FFN
CEILING_BAR = ("tokens_per_s_ffn_free", "no FFN at all\n(ceiling)", "0.85")
LLAMA_CPP_BAR = ("llama_cpp_tokens_per_s", "llama_cpp_tokens_per_s_runs", "llama.cpp F32\n(this run)", "tab:orange")
# llama.cpp's median over repeats interleaved with the dense/sparse ones (no runs listed): the bar without the above
LLAMA_CPP_INTERLEAVED = "tokens_per_s_llama_cpp_interleaved"
FLOORS = {"tokens_per_s_dense": "dense_floor_tokens_per_s", "tokens_per_s_sparse": "sparse_floor_tokens_per_s"}
PAPER_LABEL = "llama.cpp F32 recorded in ANCHORS.md"
RUNS_LABEL = "individual runs (bar: median)"
PERPLEXITY_BUDGET = 0.02  # the perplexity increase the sparse engine may cost
BAR_WIDTH = 0.6
RUN_SPREAD = 0.3  # the runs' dots sit side by side across this share of the bar's width
BAR_HEADROOM = 1.2  # y range over the highest mark, the top for the labels over it


def run_values(result: dict[str, Any], key: str) -> np.ndarray:
    """The individual runs of a metric, written as the string "33.19, 31.37, 31.62"; empty if absent.

    Raises:
      ValueError: naming the result and the metric, if a run is not a number.
    """
    text = result["metrics"].get(key)
    if text is None:
        return np.array([])
    try:
        return np.array([float(run) for run in str(text).split(",")])
    except ValueError:
        raise ValueError(f"result {result['name']!r}: {key}={text!r} is not a comma-separated list of numbers") \
            from None


def _required(result: dict[str, Any], keys: Sequence[str]) -> dict[str, float]:
    """The metrics `keys` as floats; a ValueError naming the result and the keys if any is missing or not finite."""
    metrics = result["metrics"]
    bad = [key for key in keys if not finite(metrics.get(key))]
    if bad:
        raise ValueError(f"result {result['name']!r}: metrics {bad} are missing or not finite numbers")
    return {key: float(metrics[key]) for key in keys}


def decode_bars(result: dict[str, Any]) -> list[DecodeBar]:
    """Dense, the sparse engine and, when the run measured them, the step without FFNs and llama.cpp, left to
    right."""
    values = _required(result, [metric for metric, *_ in DECODE_BARS])
    bars = [DecodeBar(metric, values[metric], run_values(result, runs_key), label, color)
            for metric, runs_key, label, color in DECODE_BARS]
    ceiling, ceiling_label, ceiling_color = CEILING_BAR
    if finite(result["metrics"].get(ceiling)):
        bars.append(DecodeBar(ceiling, float(result["metrics"][ceiling]), np.array([]), ceiling_label, ceiling_color))
    llama_cpp, llama_cpp_runs, label, color = LLAMA_CPP_BAR
    for metric in (llama_cpp, LLAMA_CPP_INTERLEAVED):
        value = result["metrics"].get(metric)
        if finite(value):
            runs = run_values(result, llama_cpp_runs) if metric == llama_cpp else np.array([])
            return [*bars, DecodeBar(metric, float(value), runs, label, color)]
    return bars


def _bar_mark(ax: Axes, x: float, y: float, **style: Any) -> None:
    """A short horizontal line across the bar at `x`, at height `y`."""
    ax.plot([x - BAR_WIDTH / 2, x + BAR_WIDTH / 2], [y, y], **style)


def _decode_panel(ax: Axes, result: dict[str, Any]) -> None:
    """(a) decode tokens/s of dense, the sparse engine and llama.cpp: each bar's runs as dots, the bandwidth floors
    as marks over the dense and sparse bars, the sparse engine's speedup over dense written between them."""
    metrics, bars = result["metrics"], decode_bars(result)
    positions = np.arange(len(bars), dtype=float)
    drawn = ax.bar(positions, [bar.tokens_per_s for bar in bars], width=BAR_WIDTH,
                   color=[bar.color for bar in bars], edgecolor="0.3")
    ax.bar_label(drawn, labels=[f"{bar.tokens_per_s:.3g}" for bar in bars], label_type="center", fontsize=10)
    ax.set_xticks(positions, [bar.label for bar in bars])
    marks = [bar.tokens_per_s for bar in bars]
    runs_label = RUNS_LABEL  # one legend entry for the dots of all bars
    for x, bar in zip(positions, bars, strict=True):
        if len(bar.runs):
            offsets = np.linspace(-0.5, 0.5, len(bar.runs)) if len(bar.runs) > 1 else np.zeros(1)
            ax.plot(x + RUN_SPREAD * BAR_WIDTH * offsets, bar.runs, ls="none", marker="o", ms=4, color="black",
                    label=runs_label)
            runs_label, marks = "_nolegend_", [*marks, *bar.runs]
        floor = metrics.get(FLOORS.get(bar.metric, ""))
        if finite(floor):
            _bar_mark(ax, x, floor, color="0.15", ls="--", lw=1.5)
            ax.annotate(f"bandwidth floor {floor:.3g}", (x, floor), textcoords="offset points", xytext=(0, 3),
                        ha="center", va="bottom", fontsize=8)
            marks.append(floor)
    paper = metrics.get("llama_cpp_f32_paper_tokens_per_s")
    if bars[-1].metric in (LLAMA_CPP_BAR[0], LLAMA_CPP_INTERLEAVED) and finite(paper):
        _bar_mark(ax, positions[-1], paper, color="saddlebrown", ls=":", lw=2, label=f"{PAPER_LABEL} ({paper:.3g})")
        marks.append(paper)

    # the speedup over an arrow from the dense bar to the sparse one, above both and their runs
    dense, sparse = bars[0], bars[1]
    arrow_y = 1.08 * max(dense.tokens_per_s, sparse.tokens_per_s, *dense.runs, *sparse.runs)
    ax.annotate("", xy=(positions[1], arrow_y), xytext=(positions[0], arrow_y),
                arrowprops={"arrowstyle": "->", "color": sparse.color, "lw": 1.2})
    ax.annotate(f"sparse / dense: {sparse.tokens_per_s / dense.tokens_per_s:.3g}x", (positions[:2].mean(), arrow_y),
                textcoords="offset points", xytext=(0, 3), ha="center", va="bottom", fontsize=9, color=sparse.color)

    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_ylim(0, BAR_HEADROOM * max(*marks, arrow_y))
    ax.set_ylabel("decode throughput (tokens/s, higher is better)")
    ax.set_title("(a) decode speed", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)


def _perplexity_panel(ax: Axes, result: dict[str, Any]) -> None:
    """(b) validation perplexity dense against sparse, the sparse engine's change written over its bar, and the
    budget (dense + PERPLEXITY_BUDGET) as a dashed line; with `perplexity_original` (a ReLU-fied model's original,
    measured in the same run) a first bar for it, so the cost of the ReLU-fication itself is visible."""
    values = _required(result, ["perplexity_dense", "perplexity_sparse"])
    dense, sparse = values["perplexity_dense"], values["perplexity_sparse"]
    original = result["metrics"].get("perplexity_original")
    labels, heights, colors = ["dense", "sparse engine"], [dense, sparse], [DENSE_COLOR, SPARSE_COLOR]
    if finite(original):
        labels = [f"original ({result['metrics'].get('original_activation', 'dense')})", "ReLU-fied dense",
                  "sparse engine"]
        heights, colors = [original, dense, sparse], [ORIGINAL_COLOR, DENSE_COLOR, SPARSE_COLOR]
    positions = list(range(len(heights)))
    drawn = ax.bar(positions, heights, width=BAR_WIDTH, color=colors, edgecolor="0.3")
    ax.bar_label(drawn, labels=[f"{h:.2f}" for h in heights], label_type="center", fontsize=10)
    ax.set_xticks(positions, labels, fontsize=8 if len(labels) == 3 else None)
    ax.annotate(f"{sparse / dense - 1:+.1%} vs dense", (positions[-1], sparse), textcoords="offset points",
                xytext=(0, 3), ha="center", va="bottom", fontsize=9, color=SPARSE_COLOR)
    if finite(original):
        ax.annotate(f"{dense / original - 1:+.1%} vs original", (positions[1], dense), textcoords="offset points",
                    xytext=(0, 3), ha="center", va="bottom", fontsize=8, color=DENSE_COLOR)
    budget = (1 + PERPLEXITY_BUDGET) * dense
    ax.axhline(budget, color="tab:red", ls="--", lw=1.2)
    ax.annotate(f"{PERPLEXITY_BUDGET:.0%} budget", (positions[-2], budget), textcoords="offset points",
                xytext=(0, 2), ha="center", va="bottom", fontsize=8, color="tab:red")
    ax.set_xlim(-0.6, positions[-1] + 0.6)
    ax.set_ylim(0, BAR_HEADROOM * max(*heights, budget))
    tokens = result["metrics"].get("perplexity_tokens")
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title(f"(b) perplexity{f' on {count(tokens)} validation tokens' if finite(tokens) else ''}", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)


def bench_sparse_figure(result: dict[str, Any]) -> Figure:
    """Two bar panels of one decode run: (a) tokens/s of dense, the sparse engine and llama.cpp (when measured)
    with their runs, bandwidth floors and the sparse speedup, (b) dense and sparse perplexity against the budget.

    Raises:
      ValueError: naming the result, if the dense or sparse tokens/s or perplexity is missing, or a list of
        runs is not numbers.
    """
    metrics = result["metrics"]
    fig = Figure(figsize=(11, 5.5), layout="constrained")
    decode_ax, perplexity_ax = fig.subplots(1, 2, width_ratios=(3, 2))
    _decode_panel(decode_ax, result)
    _perplexity_panel(perplexity_ax, result)
    title = f"Sparse decode engine against dense: {metrics.get('model', result['name'])}, batch 1, {PRECISION}"
    active = metrics.get("predicted_active_mean")
    if finite(active):
        title += f"\npredicted active share of FFN neurons: {active:.1%} (mean over layers and tokens)"
    fig.suptitle(title)
    if result.get("machine"):
        fig.supxlabel(describe_machine(result["machine"]), fontsize=7, color="0.4")
    return fig


@register("bench_sparse")
def draw_bench_sparse(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Decode tokens/s and perplexity of the sparse engine against dense decode (and llama.cpp)."""
    return save(bench_sparse_figure(result), out_dir, result["name"])
