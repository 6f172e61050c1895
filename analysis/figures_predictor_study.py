"""Figures of predictor studies: what limits a trained predictor (scaling) and how predictor designs compare (sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from figure_registry import register, save, series
from figures_predictors import OVERHEAD_BUDGET, table_with
from figures_train import finite, floats
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullLocator, PercentFormatter

from sparse_lm.utils.machine import describe_machine

TRAINED_COLUMNS = ("layer", "train_pairs", "rank", "overhead", "epoch", "steps", "val_predicted_over_true",
                   "train_predicted_over_true")
PROJECTION_COLUMNS = ("layer", "predictor_rank", "predicted_over_true")
SWEEP_COLUMNS = ("firing", "hidden", "loss", "predicted_over_true", "budget_recall_mean", "perplexity_change")
TARGET_OVER_TRUE = 1.25  # the studies aim to predict at most 1.25x the firing neurons (also the budget_recall budget)
TARGET_LABEL = f"target: predict at most {TARGET_OVER_TRUE:g}x the firing neurons"
PAIRS_MARKERS = "os^Dv"
RANK_COLORMAP = "plasma"
PLAIN_NUMBERS = FuncFormatter(lambda x, _: f"{x:g}")


def _distinct(values: np.ndarray) -> list[float]:
    return sorted(set(values[np.isfinite(values)].tolist()))


def _rows(mask: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Indices where `mask` holds, sorted by `order` (so lines run left to right)."""
    rows = np.flatnonzero(mask)
    return rows[np.argsort(order[rows], kind="stable")]


def _target_line(ax: Axes, **label: str) -> Line2D:
    return ax.axhline(TARGET_OVER_TRUE, color="tab:red", ls="--", lw=1, **label)


def overhead_budget_rank(trained: dict[str, np.ndarray]) -> float | None:
    """The predictor rank at which a predictor costs OVERHEAD_BUDGET of its FFN's FLOPs, or None without overheads.

    The overhead is affine in the rank (the biases add a constant), so it is fitted as a line given two ranks.
    """
    ok = np.isfinite(trained["rank"]) & np.isfinite(trained["overhead"]) & (trained["overhead"] > 0)
    ranks, overhead = trained["rank"][ok], trained["overhead"][ok]
    if len(set(ranks.tolist())) < 2:
        return float(OVERHEAD_BUDGET * ranks[0] / overhead[0]) if len(ranks) else None
    slope, intercept = np.polyfit(ranks, overhead, 1)
    return float((OVERHEAD_BUDGET - intercept) / slope)


def _training_panel(ax: Axes, trained: dict[str, np.ndarray], layer: float, rank_colors: dict, pair_markers: dict
                    ) -> None:
    """Predicted/true against training steps of one layer: per (rank, pairs) a solid line on validation pairs and
    a faint dotted one with hollow markers on training pairs (below the solid one: overfitting)."""
    for rank, color in rank_colors.items():
        for pairs, marker in pair_markers.items():
            rows = _rows((trained["layer"] == layer) & (trained["rank"] == rank) & (trained["train_pairs"] == pairs),
                         trained["steps"])
            steps = trained["steps"][rows]
            ax.plot(steps, trained["val_predicted_over_true"][rows], color=color, marker=marker, ms=4, lw=1.3)
            ax.plot(steps, trained["train_predicted_over_true"][rows], color=color, marker=marker, ms=4, lw=0.8,
                    ls=":", mfc="white", alpha=0.6)
    _target_line(ax)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PLAIN_NUMBERS)
    ax.set_xlabel("training steps (log scale)")


def _rank_panel(ax: Axes, trained: dict[str, np.ndarray], projection: dict[str, np.ndarray] | None,
                layer_colors: dict) -> list[Line2D]:
    """Predicted/true against predictor rank: the training-free projection per layer as a line, the predictors
    trained longest on the most pairs as dots, and the rank that costs OVERHEAD_BUDGET of the FFN.

    Returns:
      The panel's legend handles.
    """
    most_pairs, last_epoch = np.nanmax(trained["train_pairs"]), np.nanmax(trained["epoch"])
    final = (trained["train_pairs"] == most_pairs) & (trained["epoch"] == last_epoch)
    for layer, color in layer_colors.items():
        if projection is not None:
            rows = _rows(projection["layer"] == layer, projection["predictor_rank"])
            ax.plot(projection["predictor_rank"][rows], projection["predicted_over_true"][rows], color=color, lw=1.2,
                    marker=".", ms=5)
        rows = _rows(final & (trained["layer"] == layer), trained["rank"])
        ax.plot(trained["rank"][rows], trained["val_predicted_over_true"][rows], ls="", marker="o", ms=6,
                color=color, mec="black", mew=0.6, zorder=3)
    _target_line(ax)
    rank_budget = overhead_budget_rank(trained)
    if rank_budget is not None:
        ax.axvline(rank_budget, color="0.35", ls="-.", lw=1)
        ax.annotate(f"{OVERHEAD_BUDGET:.0%} of the FFN's FLOPs", (rank_budget, 0.98),
                    xycoords=("data", "axes fraction"), textcoords="offset points", xytext=(-3, 0), rotation=90,
                    ha="right", va="top", fontsize=8, color="0.35")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(PLAIN_NUMBERS)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("predictor rank (log scale; projection: its cost in predictor rank)")
    handles = [Line2D([], [], color=color, lw=1.2, label=f"layer {layer:g}") for layer, color in layer_colors.items()]
    if projection is not None:
        handles.append(Line2D([], [], color="0.4", lw=1.2, marker=".", label="training-free projection"))
    handles.append(Line2D([], [], ls="", marker="o", color="0.6", mec="black", mew=0.6,
                          label=f"trained: {most_pairs:,.0f} pairs, {last_epoch:g} epochs"))
    return handles


def predictor_scaling_figure(result: dict[str, Any]) -> Figure:
    """Per studied layer, predicted/true against training steps for each rank and training-pair count; last, the
    ratio against predictor rank beside the training-free projection reference."""
    metrics = result["metrics"]
    trained = {name: floats(values) for name, values in series(result, "trained", TRAINED_COLUMNS).items()}
    projection = ({name: floats(values) for name, values in series(result, "projection", PROJECTION_COLUMNS).items()}
                  if "projection" in (result.get("series") or {}) else None)
    layers = _distinct(trained["layer"])
    if not layers:
        raise ValueError(f"result {result['name']!r}: the 'trained' series has no rows")
    ranks, pair_counts = _distinct(trained["rank"]), _distinct(trained["train_pairs"])
    plasma = matplotlib.colormaps[RANK_COLORMAP]
    # light (small rank) to dark (large rank); the yellow end of plasma is unreadable on white
    rank_colors = {rank: plasma(0.8 * (1 - i / max(len(ranks) - 1, 1))) for i, rank in enumerate(ranks)}
    pair_markers = {pairs: PAIRS_MARKERS[i % len(PAIRS_MARKERS)] for i, pairs in enumerate(pair_counts)}
    layer_colors = {layer: f"C{i % 10}" for i, layer in enumerate(layers)}

    fig = Figure(figsize=(4 * len(layers) + 5.5, 4.8), layout="constrained")
    axes = fig.subplots(1, len(layers) + 1)
    for i, layer in enumerate(layers):
        if i:
            axes[i].sharey(axes[0])
        _training_panel(axes[i], trained, layer, rank_colors, pair_markers)
        axes[i].set_title(f"({chr(ord('a') + i)}) layer {layer:g}", color=layer_colors[layer], fontsize=10)
    target = metrics.get("target_recall")
    recall = f"recall {target:g}" if finite(target) else "the recall target"
    axes[0].set_ylabel(f"predicted / firing neurons at {recall}")
    rank_handles = _rank_panel(axes[-1], trained, projection, layer_colors)
    axes[-1].set_ylabel(f"predicted / firing neurons at {recall} (validation)")
    rank_panel = f"({chr(ord('a') + len(layers))}) against predictor rank"
    axes[-1].set_title(rank_panel, fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.legend(handles=[
        *(Line2D([], [], color=color, lw=1.3, label=f"rank {rank:g}") for rank, color in rank_colors.items()),
        *(Line2D([], [], ls="", marker=marker, color="0.3", label=f"{pairs:,.0f} training pairs")
          for pairs, marker in pair_markers.items()),
        Line2D([], [], color="0.3", lw=1.3, label="on validation pairs"),
        Line2D([], [], color="0.3", lw=0.8, ls=":", marker="o", mfc="white", alpha=0.6,
               label="on training pairs (below validation: overfitting)"),
        Line2D([], [], color="tab:red", ls="--", lw=1, label=TARGET_LABEL),
    ], loc="outside right upper", fontsize=8)
    fig.legend(handles=rank_handles, title=rank_panel, loc="outside right lower", fontsize=8, title_fontsize=8)

    model = metrics.get("model", result["name"])
    activation = f"{metrics['activation']} FFN" if metrics.get("activation") else "FFN"
    rule = f", {metrics['firing_rule']} firing rule" if metrics.get("firing_rule") else ""
    fig.suptitle(f"Predictor scaling: {model} ({activation}{rule})")
    if result.get("machine"):
        fig.supxlabel(describe_machine(result["machine"]), fontsize=7, color="0.4")
    return fig


@register("predictor_scaling")
def draw_predictor_scaling(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Predicted/true of trained predictors against steps, pairs and rank, beside the projection reference."""
    return save(predictor_scaling_figure(result), out_dir, result["name"])


# ------------------------------------------------------------------------------------------------ sweep

SWEEP_PANELS = (
    # (column, title, y label, bar label format)
    ("predicted_over_true", "(a) predicted / firing neurons at the recall target",
     "predicted / firing neurons (lower is better)", "{:.2f}"),
    ("budget_recall_mean", f"(b) recall when predicting {TARGET_OVER_TRUE:g}x the firing neurons",
     "recall at the budget (higher is better)", "{:.3f}"),
    ("perplexity_change", "(c) perplexity change against the dense model",
     "perplexity change with predictors (lower is better)", "{:+.2%}"),
)


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _levels(runs: dict[str, Any], name: str) -> set[str]:
    """The distinct values of a sweep column, as text (a rank range such as "32-384" is text)."""
    return {_text(value) for value in runs.get(name, [])}


def sweep_designs(runs: dict[str, Any]) -> list[str]:
    """Each run's predictor design, "<hidden> + <loss>", with its epochs and rank when the sweep varies them."""
    varying = [name for name in ("epochs", "rank") if len(_levels(runs, name)) > 1]
    return [" + ".join(["linear" if hidden == "none" else f"{hidden} hidden", str(loss)])
            + "".join(f", {name} {_text(runs[name][i])}" for name in varying)
            for i, (hidden, loss) in enumerate(zip(runs["hidden"], runs["loss"], strict=True))]


def _grouped_bars(ax: Axes, runs: dict[str, Any], column: str, designs: list[str], label_format: str) -> None:
    """One group of bars per firing rule, one bar per design in it; NaN where the sweep lacks the pair."""
    firings, names = list(dict.fromkeys(runs["firing"])), list(dict.fromkeys(designs))
    value = {(firing, design): v for firing, design, v in zip(runs["firing"], designs, runs[column], strict=True)}
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        heights = np.array([value.get((firing, name), np.nan) for firing in firings], dtype=float)
        bars = ax.bar(np.arange(len(firings)) + (i - (len(names) - 1) / 2) * width, heights, width, label=name,
                      color=f"C{i % 10}")
        ax.bar_label(bars, labels=[label_format.format(h) if np.isfinite(h) else "" for h in heights], padding=2,
                     fontsize=7)
    ax.set_xticks(range(len(firings)), firings)
    ax.set_xlabel("firing rule")
    ax.margins(y=0.12)


def predictor_sweep_figure(result: dict[str, Any]) -> Figure:
    """Grouped bars per firing rule and predictor design: (a) predicted/true at the recall target, (b) recall at a
    1.25x budget, (c) perplexity change against the dense model."""
    metrics = result["metrics"]
    runs = table_with(result, SWEEP_COLUMNS, "predictor-sweep")
    designs = sweep_designs(runs)
    fig = Figure(figsize=(16, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (column, title, ylabel, label_format) in zip(axes, SWEEP_PANELS, strict=True):
        _grouped_bars(ax, runs, column, designs, label_format)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.spines[["top", "right"]].set_visible(False)
    ratio_ax, budget_ax, ppl_ax = axes
    target = _target_line(ratio_ax, label=TARGET_LABEL)
    ppl_ax.axhline(0, color="0.3", lw=0.8)
    ppl_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    dense = _distinct(np.asarray(runs.get("perplexity_dense", []), dtype=float))
    if len(dense) == 1:
        ppl_ax.set_title(f"{SWEEP_PANELS[2][1]}\n(dense perplexity {dense[0]:.4g})", fontsize=10)
    fig.legend(handles=[*ratio_ax.containers, target], title="predictor design", loc="outside right upper",
               fontsize=8)

    shared = [f"{name} {_levels(runs, name).pop()}" for name in ("epochs", "rank") if len(_levels(runs, name)) == 1]
    best = metrics.get("best_predicted_over_true")
    fig.suptitle(f"Predictor sweep: {metrics.get('model', result['name'])} ({len(designs)} runs"
                 + (f"; {', '.join(shared)} each" if shared else "") + ")"
                 + (f"\nbest predicted / firing {best:.3f}: {metrics['best_run']}"
                    if finite(best) and metrics.get("best_run") else ""))
    if result.get("machine"):
        fig.supxlabel(describe_machine(result["machine"]), fontsize=7, color="0.4")
    return fig


@register("predictor_sweep")
def draw_predictor_sweep(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Predicted/true, budget recall and perplexity change per firing rule and predictor design of a sweep."""
    return save(predictor_sweep_figure(result), out_dir, result["name"])
