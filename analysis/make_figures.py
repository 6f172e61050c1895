"""Redraws every figure from the result files in results/*.json (no model code runs here).

Usage: `python analysis/make_figures.py [--results-dir results] [--out-dir docs/figures]`.

Each result whose name has a registered drawing function gets `<out-dir>/<name>.png` and `.pdf`;
`python -m sparse_lm.results render` then links the PNGs from docs/RESULTS.md. Drawing functions register
in `figure_registry.py`: here (benchmarks, profiles), in `figures_bench.py` (kernel and sparse decode
benchmarks), in `figures_train.py` (training runs), in `figures_predictors.py` (activation predictors), in
`figures_predictor_study.py` (predictor scaling, sweeps), in `figures_roofline.py` (cost-model validation) and in
`figures_offload.py` (placement sweep).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import figures_bench  # noqa: F401  (registers the sparse-FFN and sparse-decode benchmark figures)
import figures_disk  # noqa: F401  (registers the disk tier figure)
import figures_frontier  # noqa: F401  (registers the perplexity-sparsity frontier figure)
import figures_offload  # noqa: F401  (registers the placement sweep figure)
import figures_predictor_study  # noqa: F401  (registers the predictor scaling and sweep figures)
import figures_predictors  # noqa: F401  (registers the activation-predictor figure)
import figures_roofline  # noqa: F401  (registers the cost-model validation figure)
import figures_train  # noqa: F401  (registers the training figures)
import matplotlib
from figure_registry import columns, find_figure, register, save, table
from matplotlib.figure import Figure

from sparse_lm.results import load_results
from sparse_lm.utils.machine import describe_machine

matplotlib.use("Agg")  # files only, never a window

RESULTS_DIR = "results"
FIGURES_DIR = "docs/figures"


# ------------------------------------------------------------------------------------------------ figures

DECODE_BARS = (
    # (metric, label, required)
    ("bandwidth_floor_tokens_per_s", "memory-bandwidth bound", True),
    ("sparse_lm_tokens_per_s", "sparse_lm", True),
    ("llama_cpp_f32_tokens_per_s", "llama.cpp f32 (measured here)", False),
    ("llama_cpp_f32_paper_tokens_per_s", "llama.cpp f32 (paper)", False),
)
_DECODE_COLORS = {
    "bandwidth_floor_tokens_per_s": "0.75",
    "sparse_lm_tokens_per_s": "tab:blue",
    "llama_cpp_f32_tokens_per_s": "tab:orange",
    "llama_cpp_f32_paper_tokens_per_s": "tab:green",
}


def decode_benchmark_bars(metrics: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(metric, label, tokens/s) per bar of the decode figure, top to bottom; optional bars if present."""
    bars = []
    for metric, label, required in DECODE_BARS:
        value = metrics.get(metric)
        if value is None:
            if required:
                raise ValueError(f"decode_benchmark: metrics lacks {metric!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"decode_benchmark: {metric}={value!r} is not a finite number")
        bars.append((metric, label, float(value)))
    return bars


@register("decode_benchmark")
def draw_decode_benchmark(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Horizontal bars of decode throughput (tokens/s): sparse_lm against its bound and llama.cpp."""
    bars = decode_benchmark_bars(result["metrics"])
    model = result["metrics"].get("model")
    fig = Figure(figsize=(7, 0.6 * len(bars) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    positions = range(len(bars))
    drawn = ax.barh(
        positions,
        [value for _, _, value in bars],
        color=[_DECODE_COLORS[metric] for metric, _, _ in bars],
        hatch=["//" if metric == "bandwidth_floor_tokens_per_s" else "" for metric, _, _ in bars],
        edgecolor="0.3",
    )
    ax.bar_label(drawn, labels=[f"{value:.3g}" for _, _, value in bars], padding=3)
    ax.set_yticks(list(positions), [label for _, label, _ in bars])
    ax.invert_yaxis()  # first bar on top
    ax.set_xlim(0, 1.15 * max(value for _, _, value in bars))
    ax.set_xlabel("decode throughput (tokens/s, higher is better)")
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"Decode throughput: {model}" if model else "Decode throughput")
    if result.get("machine"):
        fig.supxlabel(describe_machine(result["machine"]), fontsize=7, color="0.4")
    return save(fig, out_dir, result["name"])


@register("profile")
def draw_profile(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Coverage curves per layer, the log-log firing-count distribution with its fit, per-layer sparsity."""
    metrics, name = result["metrics"], result["name"]
    paths = []
    # 1. coverage curves (PowerInfer Fig. 4 style)
    cov = columns(table(result, "Coverage curves"))
    layers = [c for c in cov if c.startswith("layer_")]
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"]
    for i, layer in enumerate(layers):
        ax.plot(cov["neuron_fraction"], cov[layer], color=cmap(i / max(len(layers) - 1, 1)), lw=0.8, alpha=0.8)
    ax.plot(cov["neuron_fraction"], cov["model"], color="black", lw=2, label="all layers")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="uniform")
    ax.axhline(0.8, color="tab:red", lw=0.8, ls=":")
    ax.set_xlabel("fraction of neurons (most active first)")
    ax.set_ylabel("fraction of all firings")
    ax.legend(loc="lower right")
    ax.set_title(f"Firing coverage per layer (shallow: purple, deep: yellow)\n{metrics['model']}, "
                 f"{metrics['firing_rule']} rule; 80% of firings in {metrics['coverage80_model']:.0%} of neurons",
                 fontsize=9)
    paths += save(fig, out_dir, f"{name}_coverage")
    # 2. firing-count distribution, log-log, with the fitted power law
    dist = columns(table(result, "Firing-count distribution"))
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.loglog(dist["count"], dist["ccdf"], "o", ms=3, color="tab:blue", label="neurons (empirical)")
    alpha, xmin = metrics["powerlaw_exponent"], metrics["powerlaw_xmin"]
    tail_share = metrics["powerlaw_n_tail"] / metrics["powerlaw_n"]
    xs = [x for x in dist["count"] if x >= xmin]
    if xs:
        ax.loglog(xs, [tail_share * (x / xmin) ** (1 - alpha) for x in xs], color="tab:red",
                  label=f"power law, alpha={alpha:.2f} [{metrics['powerlaw_ci_low']:.2f}, "
                  f"{metrics['powerlaw_ci_high']:.2f}], x_min={xmin:g}")
    verdicts = "\n".join(
        f"vs {alt}: {metrics[f'powerlaw_vs_{alt}_verdict']} (R={metrics[f'powerlaw_vs_{alt}_R']:.1f})"
        for alt in ("lognormal", "exponential", "truncated_power_law") if f"powerlaw_vs_{alt}_R" in metrics
    )
    ax.set_xlabel("tokens a neuron fired for")
    ax.set_ylabel("P(count >= x)")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(f"Neuron firing-count distribution, {metrics['model']}\n{verdicts}", fontsize=8)
    paths += save(fig, out_dir, f"{name}_distribution")
    # 3. per-layer sparsity under each rule
    per_layer = columns(table(result, "Per layer"))
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(per_layer["layer"], per_layer["sparsity"], marker="o", label=f"{metrics['firing_rule']} (all corpora)")
    for column in per_layer:
        if column.startswith("sparsity_") and column not in ("sparsity",):
            ax.plot(per_layer["layer"], per_layer[column], marker=".", lw=1, label=column.removeprefix("sparsity_"))
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (fraction of neurons not firing per token)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"Per-layer sparsity, {metrics['model']}", fontsize=9)
    paths += save(fig, out_dir, f"{name}_sparsity")
    return paths


@register("teal")
def draw_teal(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Perplexity against the achieved FFN sparsity of calibrated magnitude thresholds."""
    data = columns(table(result, "Perplexity per target sparsity"))
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(data["achieved_sparsity"], data["perplexity"], marker="o")
    for x, y, inc in zip(data["achieved_sparsity"], data["perplexity"], data["increase_percent"], strict=True):
        ax.annotate(f"{inc:+.1f}%", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("FFN hidden-activation sparsity (achieved on the scored split)")
    ax.set_ylabel("perplexity")
    metrics = result["metrics"]
    ax.set_title(f"Training-free sparsity: {metrics['model']} on {metrics['corpus']}/{metrics['split']}", fontsize=9)
    return save(fig, out_dir, result["name"])


# ------------------------------------------------------------------------------------------------ driver


def make_figures(results_dir: str | Path = RESULTS_DIR, out_dir: str | Path = FIGURES_DIR) -> list[Path]:
    """Draws the figure of every result that has one; prints one line per result."""
    written = []
    for result in load_results(results_dir):
        draw = find_figure(result["name"])
        if draw is None:
            print(f"skip {result['name']}: no figure registered")
            continue
        paths = draw(result, Path(out_dir))
        print(f"{result['name']}: wrote {', '.join(str(p) for p in paths)}")
        written += paths
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="folder of result JSON files")
    parser.add_argument("--out-dir", default=FIGURES_DIR, help="folder for the PNG and PDF figures")
    args = parser.parse_args(argv)
    make_figures(args.results_dir, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
