"""Figures of training runs, from their result `series`: the from-scratch FFN-variant sweep and ReLU-fication."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from figure_registry import columns, register, save, series
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogFormatter

from sparse_lm.utils.machine import describe_machine

# perplexity_top90 keeps each token's 10% largest |a| per layer, so at least 90% of the activations are zero.
TOP_K_COLUMN, TOP_K_SPARSITY = "perplexity_top90", 0.9


def floats(values: list) -> np.ndarray:
    """Numbers as float64; None (a missing value) becomes NaN, which matplotlib leaves out."""
    return np.array([math.nan if value is None else value for value in values], dtype=float)


def count(value: float) -> str:
    """A token or parameter count in three digits: 614400 -> "614k", 10690560 -> "10.7M"."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def by_variant(cols: dict[str, list]) -> dict[str, dict[str, np.ndarray]]:
    """Numeric columns of a series split by its "variant" column, variants in order of first appearance."""
    variants = cols["variant"]
    curves = {}
    for variant in dict.fromkeys(variants):
        rows = [i for i, v in enumerate(variants) if v == variant]
        curves[variant] = {
            name: floats([values[i] for i in rows]) for name, values in cols.items() if name != "variant"
        }
    return curves


def _marker(xs: np.ndarray) -> str | None:
    """Markers on curves too short to read as lines (a smoke run logs one or two steps)."""
    return "o" if len(xs) < 5 else None


def _tokens_axis(ax: Axes) -> None:
    ax.set_xlabel("training tokens")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: count(x)))
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _perplexity_axis(ax: Axes) -> None:
    """Log scale with plain-number labels, on the minor ticks too when the range spans less than two decades."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_ylabel("validation perplexity (log scale, lower is better)")
    ax.grid(alpha=0.3, which="both")


def _name_points(ax: Axes, names: list[tuple[str, float, float, str]]) -> None:
    """Writes each (name, x, y, color) under its point, or above it where it would overprint an earlier name
    (drelu and relu2 often end up close together). Call once the axis limits are final."""
    to_axes = ax.transData + ax.transAxes.inverted()
    below_names = []  # axes-fraction positions of the names written below their points
    for name, x, y, color in sorted(names, key=lambda item: item[1]):
        ax_x, ax_y = to_axes.transform((x, y))
        below = not any(abs(ax_x - bx) < 0.12 and abs(ax_y - by) < 0.08 for bx, by in below_names)
        if below:
            below_names.append((ax_x, ax_y))
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(0, -8 if below else 8), ha="center",
                    va="top" if below else "bottom", fontsize=8, color=color)


def _footer(fig: Figure, result: dict[str, Any]) -> None:
    if result.get("machine"):
        fig.supxlabel(describe_machine(result["machine"]), fontsize=7, color="0.4")


def scratch_ffn_sweep_figure(result: dict[str, Any]) -> Figure:
    """(a) training loss and (b) training-batch sparsity against tokens per FFN variant; (c) validation
    perplexity against sparsity per variant, dense and with only the top-10% activations kept."""
    train = by_variant(series(result, "train", ("variant", "tokens", "loss", "sparsity")))
    final = columns(next(t for t in result["tables"] if t["columns"][0] == "variant"))  # collect_sweep's table
    variants = list(dict.fromkeys([*final["variant"], *train]))
    colors = {variant: f"C{i % 10}" for i, variant in enumerate(variants)}
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    loss_ax, sparsity_ax, ppl_ax = fig.subplots(1, 3)
    for variant, curve in train.items():
        style = {"color": colors[variant], "lw": 1.2, "label": variant, "marker": _marker(curve["tokens"])}
        loss_ax.plot(curve["tokens"], curve["loss"], **style)
        sparsity_ax.plot(curve["tokens"], curve["sparsity"], **style)
    loss_ax.set_ylabel("training loss (cross-entropy)")
    loss_ax.set_title("(a) training loss", fontsize=10)
    loss_ax.legend(title="FFN variant", fontsize=8)
    sparsity_ax.set_ylabel("exact-zero fraction of FFN activations (training batch)")
    sparsity_ax.set_ylim(-0.02, 1.02)
    sparsity_ax.set_title("(b) activation sparsity during training", fontsize=10)
    for ax in (loss_ax, sparsity_ax):
        _tokens_axis(ax)

    n = len(final["variant"])
    top_k = final.get(TOP_K_COLUMN, [None] * n)
    names = []
    for variant, ppl, sparsity, ppl_top in zip(final["variant"], final["val_perplexity"], final["sparsity"], top_k,
                                               strict=True):
        color = colors[variant]
        if finite(ppl) and finite(sparsity):
            ppl_ax.plot(sparsity, ppl, "o", color=color, ms=7)
            names.append((variant, sparsity, ppl, color))
        if finite(ppl_top):
            top_sparsity = max(sparsity, TOP_K_SPARSITY) if finite(sparsity) else TOP_K_SPARSITY
            ppl_ax.plot(top_sparsity, ppl_top, "v", color=color, ms=7, mfc="white", mew=1.5)
            if finite(ppl) and finite(sparsity):
                ppl_ax.plot([sparsity, top_sparsity], [ppl, ppl_top], color=color, lw=0.7, alpha=0.6)
    _perplexity_axis(ppl_ax)
    ppl_ax.set_xlim(-0.05, 1.05)
    low, high = ppl_ax.get_ylim()
    ppl_ax.set_ylim(low * (high / low) ** -0.1, high * (high / low) ** 0.05)  # room for the names
    _name_points(ppl_ax, names)
    ppl_ax.set_xlabel("exact-zero fraction of FFN activations (validation)")
    ppl_ax.set_title("(c) perplexity against sparsity at the end of training", fontsize=10)
    ppl_ax.legend(handles=[
        Line2D([], [], marker="o", ls="", color="0.3", label="all activations"),
        Line2D([], [], marker="v", ls="", color="0.3", mfc="white", mew=1.5,
               label=f"top-{1 - TOP_K_SPARSITY:.0%} |a| kept per token"),
    ], fontsize=8, loc="best")
    ppl_ax.spines[["top", "right"]].set_visible(False)

    detail = []  # shared by every variant by design; said once in the title when it holds
    for column, unit in (("params", "parameters"), ("tokens", "tokens")):
        values = set(final.get(column, []))
        if len(values) == 1 and finite(value := values.pop()):
            detail.append(f"{count(value)} {unit}")
    fig.suptitle(result["title"] + (f" ({', '.join(detail)} per variant)" if detail else ""))
    _footer(fig, result)
    return fig


@register("relufy_family_sweep")
@register("relufy_lr_sweep")
@register("relufy_recipe_sweep")
@register("scratch_ffn_sweep")
def draw_scratch_ffn_sweep(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Training curves of each FFN variant trained from scratch, and its final perplexity against sparsity."""
    return save(scratch_ffn_sweep_figure(result), out_dir, result["name"])


def relufy_figure(result: dict[str, Any]) -> Figure:
    """Training loss, sparsity and validation perplexity against tokens of one ReLU-fication run, with the
    original model's perplexity as a reference line."""
    metrics = result["metrics"]
    train = {k: floats(v) for k, v in series(result, "train", ("tokens", "loss", "sparsity")).items()}
    evals = {k: floats(v) for k, v in series(result, "eval", ("tokens", "val_perplexity", "sparsity")).items()}
    activation = metrics.get("activation", "relufied")
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    loss_ax, sparsity_ax, ppl_ax = fig.subplots(1, 3)

    loss_ax.plot(train["tokens"], train["loss"], lw=1.2, color="C0", marker=_marker(train["tokens"]))
    loss_ax.set_ylabel("training loss (cross-entropy)")
    loss_ax.set_title("(a) training loss", fontsize=10)

    sparsity_ax.plot(train["tokens"], train["sparsity"], lw=1.2, color="C0", marker=_marker(train["tokens"]),
                     label="training batches")
    sparsity_ax.plot(evals["tokens"], evals["sparsity"], "o", color="C1", label="validation")
    sparsity_ax.set_ylabel("exact-zero fraction of FFN activations")
    sparsity_ax.set_ylim(-0.02, 1.02)
    sparsity_ax.set_title("(b) activation sparsity", fontsize=10)
    sparsity_ax.legend(fontsize=8, loc="lower right")

    ppl_ax.plot(evals["tokens"], evals["val_perplexity"], "o-", color="C1", label=f"{activation} model")
    top_k = metrics.get(TOP_K_COLUMN)
    if finite(top_k) and len(evals["tokens"]):
        ppl_ax.plot(evals["tokens"][-1], top_k, "v", color="C1", ms=8, mfc="white", mew=1.5,
                    label=f"end, top-{1 - TOP_K_SPARSITY:.0%} |a| kept: {top_k:.4g}")
    before = metrics.get("before_val_perplexity")
    if finite(before):
        ppl_ax.axhline(before, color="0.35", ls="--", lw=1)
        original = " ".join(filter(None, ["original", metrics.get("before_activation"), "model"]))
        ppl_ax.annotate(f"{original}: {before:.4g}",
                        (0.02, before), xycoords=("axes fraction", "data"), textcoords="offset points",
                        xytext=(0, 3), fontsize=8, color="0.35")
    _perplexity_axis(ppl_ax)
    ppl_ax.set_title("(c) validation perplexity", fontsize=10)
    ppl_ax.legend(fontsize=8, loc="upper right")
    for ax in (loss_ax, sparsity_ax, ppl_ax):
        _tokens_axis(ax)

    source = metrics.get("before_activation")
    params = metrics.get("params")
    fig.suptitle(f"{result['title']} (" + (f"{source} \N{RIGHTWARDS ARROW} " if source else "") + f"{activation} FFN"
                 + (f", {count(params)} parameters" if finite(params) else "") + ")")
    _footer(fig, result)
    return fig


@register("relufy")
def draw_relufy(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Training curves of a ReLU-fication run against the original model's perplexity."""
    return save(relufy_figure(result), out_dir, result["name"])
