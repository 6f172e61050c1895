"""Figures of activation-predictor results: recall against rank, predictor size against sparsity, perplexity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from figure_registry import columns, register, save, series
from figures_train import finite, floats
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullLocator, PercentFormatter

from sparse_lm.utils.machine import describe_machine

PER_LAYER_COLUMNS = ("layer", "rank", "recall", "precision", "true_active", "budget_recall", "overhead")
CURVE_COLUMNS = ("target_recall", "predicted_active_mean", "perplexity_predicted")
CANDIDATE_COLUMNS = ("rank", "layer", "budget_recall")
ADAPTIVE_VS_UNIFORM_COLUMNS = ("sizing", "predicted_over_true")
OVERHEAD_BUDGET = 0.10  # PowerInfer keeps each predictor under ~10% of the FFN it gates
DEPTH_COLORMAP = "viridis"


def table_with(result: dict[str, Any], required: Sequence[str], what: str) -> dict[str, np.ndarray | list]:
    """Columns of the result's first table holding every `required` column; numbers as float64 arrays.

    Raises:
      ValueError: naming the result and `what` the table is, if no table has those columns.
    """
    for candidate in result.get("tables", []):
        if set(required) <= set(candidate["columns"]):
            return {name: _numeric(values) for name, values in columns(candidate).items()}
    raise ValueError(f"result {result['name']!r} has no {what} table (columns {list(required)}), "
                     "which its figure needs")


def _numeric(values: list) -> np.ndarray | list:
    """A column of numbers (None and NaN allowed) as float64, any other column unchanged."""
    numbers = all(value is None or (isinstance(value, int | float) and not isinstance(value, bool)) for value in values)
    return floats(values) if numbers else values


def _by_layer(candidates: dict[str, list]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Layer -> (ranks, budget recall) of the candidate fits, ranks ascending."""
    layers, ranks, recall = (floats(candidates[k]) for k in ("layer", "rank", "budget_recall"))
    curves = {}
    for layer in sorted(set(layers.astype(int))):
        rows = np.flatnonzero(layers == layer)
        rows = rows[np.argsort(ranks[rows])]
        curves[layer] = (ranks[rows], recall[rows])
    return curves


def _depth_colors(n_layers: int) -> ScalarMappable:
    return ScalarMappable(Normalize(0, max(n_layers - 1, 1)), matplotlib.colormaps[DEPTH_COLORMAP])


def _depth_colorbar(fig: Figure, ax: Axes, depth: ScalarMappable) -> None:
    colorbar = fig.colorbar(depth, ax=ax, pad=0.01, fraction=0.05)
    colorbar.set_label("layer (shallow \N{RIGHTWARDS ARROW} deep)")
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()


def _recall_against_rank(ax: Axes, per_layer: dict, candidates: dict[str, list], depth: ScalarMappable) -> None:
    """(a) Budget recall of every candidate rank, one line per layer, with each layer's chosen rank dotted."""
    for layer, (ranks, recall) in _by_layer(candidates).items():
        ax.plot(ranks, recall, color=depth.to_rgba(layer), lw=1, alpha=0.85)
    layers = per_layer["layer"]
    ax.scatter(per_layer["rank"], per_layer["budget_recall"], c=[depth.to_rgba(layer) for layer in layers], s=28,
               edgecolors="black", linewidths=0.6, zorder=3)
    ax.set_xscale("log", base=2)
    tried = sorted(set(floats(candidates["rank"]).astype(int)))
    ax.set_xticks(tried, [str(rank) for rank in tried])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("predictor rank (log scale)")
    ax.set_ylabel("recall at a fixed prediction budget")
    ax.set_title("(a) recall against predictor rank, per layer\n(each layer predicts a fixed multiple of its firing "
                 "neurons)", fontsize=10)
    ax.legend(handles=[Line2D([], [], marker="o", ls="", color="0.6", mec="black", mew=0.6,
                              label="rank chosen for the layer")], fontsize=8, loc="lower right")


def _recall_precision_bars(ax: Axes, per_layer: dict, target_recall: Any) -> None:
    """(a) without candidate ranks: recall and precision per layer at the calibrated threshold."""
    layers = per_layer["layer"]
    ax.bar(layers - 0.2, per_layer["recall"], width=0.4, color="C0", label="recall")
    ax.bar(layers + 0.2, per_layer["precision"], width=0.4, color="C1", label="precision")
    if finite(target_recall):
        ax.axhline(target_recall, color="0.35", ls="--", lw=1, label=f"target recall {target_recall:g}")
    ax.set_ylim(0, 1.1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of neurons (calibrated threshold)")
    ax.set_title("(a) recall and precision per layer", fontsize=10)
    ax.legend(fontsize=8, loc="lower right", ncol=3)


def _labelled_layers(sparsity: np.ndarray, overhead: np.ndarray) -> list[int]:
    """Row indices worth naming: the first and last layers and the extremes of either axis."""
    picks = [0, len(sparsity) - 1, *(f(values) for values in (sparsity, overhead) for f in (np.argmin, np.argmax))]
    return sorted({int(i) for i in picks})


def _size_against_sparsity(ax: Axes, per_layer: dict, depth: ScalarMappable) -> None:
    """(b) Each layer's predictor size as a share of its FFN against the layer's sparsity (PowerInfer Fig. 9)."""
    layers = per_layer["layer"]
    sparsity, overhead = 1 - per_layer["true_active"], per_layer["overhead"]
    ax.scatter(sparsity, overhead, c=[depth.to_rgba(layer) for layer in layers], s=30, edgecolors="0.2",
               linewidths=0.5, zorder=3)
    for i in _labelled_layers(sparsity, overhead):
        ax.annotate(f"L{int(layers[i])}", (sparsity[i], overhead[i]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axhline(OVERHEAD_BUDGET, color="tab:red", ls="--", lw=1)
    ax.annotate(f"{OVERHEAD_BUDGET:.0%} overhead budget", (0.02, OVERHEAD_BUDGET), xycoords=("axes fraction", "data"),
                textcoords="offset points", xytext=(0, 3), fontsize=8, color="tab:red")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("layer sparsity (share of neurons not firing per token)")
    ax.set_ylabel("predictor parameters / FFN parameters")
    ax.set_title("(b) predictor size against layer sparsity", fontsize=10)


def uniform_predicted_active(result: dict[str, Any]) -> float | None:
    """Mean predicted-active share of the uniform-rank predictors, or None without adaptive sizing.

    The adaptive/uniform table gives predicted_over_true = sum(predicted) / sum(true) over layers; the truly
    active share comes from the dense model on the same measured tokens for both sizings, so
    predicted_active_mean = predicted_over_true * true_active_mean.
    """
    true_active = result["metrics"].get("true_active_mean")
    for candidate in result.get("tables", []):
        if set(ADAPTIVE_VS_UNIFORM_COLUMNS) <= set(candidate["columns"]):
            cols = columns(candidate)
            for sizing, ratio in zip(cols["sizing"], cols["predicted_over_true"], strict=True):
                if sizing == "uniform" and finite(ratio) and finite(true_active):
                    return ratio * true_active
    return None


def _perplexity_against_sparsity(ax: Axes, result: dict[str, Any], curve: dict) -> None:
    """(c) Perplexity with every FFN gated by its predictor, one point per target recall, against the dense model."""
    metrics = result["metrics"]
    sparsity, perplexity = 1 - curve["predicted_active_mean"], curve["perplexity_predicted"]
    ax.plot(sparsity, perplexity, "o-", color="C0", label="adaptive ranks (labels: target recall)")
    for x, y, target in zip(sparsity, perplexity, curve["target_recall"], strict=True):
        ax.annotate(f"{target:g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8,
                    color="C0")
    uniform_ppl, uniform_active = metrics.get("uniform_perplexity_predicted"), uniform_predicted_active(result)
    if finite(uniform_ppl) and uniform_active is not None:
        rank = metrics.get("uniform_rank")
        label = f"uniform rank {rank}" if rank is not None else "uniform rank"
        target = metrics.get("target_recall")
        ax.plot(1 - uniform_active, uniform_ppl, "s", color="C1", ms=7, mfc="white", mew=1.5,
                label=label + (f", target recall {target:g}" if finite(target) else ""))
    dense = metrics.get("perplexity_dense")
    if finite(dense):
        ax.axhline(dense, color="0.35", ls="--", lw=1)
        ax.annotate(f"dense model: {dense:.4g}", (0.02, dense), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(0, 3), fontsize=8, color="0.35")
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel("predicted sparsity (share of FFN neurons skipped)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("(c) perplexity against predicted sparsity", fontsize=10)
    ax.legend(fontsize=8, loc="best")


def predictors_figure(result: dict[str, Any]) -> Figure:
    """(a) recall against predictor rank per layer (or recall and precision per layer without rank candidates),
    (b) each layer's predictor size against its sparsity, (c) perplexity against predicted sparsity."""
    metrics = result["metrics"]
    per_layer = table_with(result, PER_LAYER_COLUMNS, "per-layer")
    curve = table_with(result, CURVE_COLUMNS, "perplexity-against-sparsity")
    candidates = (series(result, "candidates", CANDIDATE_COLUMNS)
                  if "candidates" in (result.get("series") or {}) else None)
    depth = _depth_colors(len(per_layer["layer"]))
    fig = Figure(figsize=(16, 4.8), layout="constrained")
    recall_ax, size_ax, ppl_ax = fig.subplots(1, 3)
    if candidates is not None:
        _recall_against_rank(recall_ax, per_layer, candidates, depth)
        _depth_colorbar(fig, recall_ax, depth)
    else:
        _recall_precision_bars(recall_ax, per_layer, metrics.get("target_recall"))
    _size_against_sparsity(size_ax, per_layer, depth)
    if candidates is None:  # (a) has no depth colours then, so the scale goes beside (b)
        _depth_colorbar(fig, size_ax, depth)
    _perplexity_against_sparsity(ppl_ax, result, curve)
    for ax in (recall_ax, size_ax, ppl_ax):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)

    model = metrics.get("model", result["name"])
    rule = f", {metrics['firing_rule']} firing rule" if metrics.get("firing_rule") else ""
    activation = f"{metrics['activation']} FFN" if metrics.get("activation") else "FFN"
    share = metrics.get("predictor_param_share")
    fig.suptitle(f"Activation predictors: {model} ({activation}{rule})"
                 + (f"; predictors add {share:.1%} to the model's parameters" if finite(share) else ""))
    if result.get("machine"):
        fig.supxlabel(describe_machine(result["machine"]), fontsize=7, color="0.4")
    return fig


@register("predictors")
def draw_predictors(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Recall against rank, predictor size against layer sparsity and perplexity of one predictor run."""
    return save(predictors_figure(result), out_dir, result["name"])
