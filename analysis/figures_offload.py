"""Figures of the offload results: the placement sweep (place_sweep* results, PowerInfer Fig. 10 style: projected
decode tokens/s against GPU memory per policy, one panel per machine, and the share of firings the GPU neurons
serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from figure_registry import columns, register, save, table
from matplotlib.figure import Figure

PLACE_TABLE = "Placement and projected decode per budget"
POLICIES = (  # (column, label, style)
    ("tokens_per_s_powerinfer", "PowerInfer, ILP placement", ("tab:blue", "-", "o")),
    ("tokens_per_s_layer_split", "llama.cpp layer split", ("tab:orange", "-", "s")),
    ("tokens_per_s_flexgen", "FlexGen streaming", ("tab:green", "-", "^")),
    ("tokens_per_s_all_fast", "all on the GPU (where it fits)", ("0.3", ":", "")),
)
GREEDY_STYLE = ("tab:cyan", "--", "x")


def place_sweep_panels(result: dict[str, Any]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """hardware -> solver -> column -> values sorted by budget."""
    cols = columns(table(result, PLACE_TABLE))
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for hardware in sorted(set(cols["hardware"])):
        out[hardware] = {}
        for solver in ("ilp", "greedy"):
            rows = [i for i, (h, s) in enumerate(zip(cols["hardware"], cols["solver"], strict=True))
                    if h == hardware and s == solver]
            rows.sort(key=lambda i: cols["budget_gib"][i])
            if rows:
                out[hardware][solver] = {name: np.array([cols[name][i] for i in rows], dtype=float)
                                         for name in cols if name not in ("hardware", "solver")}
    if not any(out.values()):
        raise ValueError(f"result {result['name']!r} has no placement rows")
    return out


@register("place_sweep")
def draw_place_sweep(result: dict[str, Any], out_dir: Path) -> list[Path]:
    return save(place_sweep_figure(result), out_dir, result["name"])


def place_sweep_figure(result: dict[str, Any]) -> Figure:
    panels = place_sweep_panels(result)
    fig = Figure(figsize=(5.2 * len(panels), 6.4), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex="col", height_ratios=(2.2, 1))
    for col, (hardware, solvers) in enumerate(panels.items()):
        top, bottom = axes[0, col], axes[1, col]
        ilp = solvers.get("ilp") or next(iter(solvers.values()))
        budget = ilp["budget_gib"]
        for name, label, (color, line, marker) in POLICIES:
            values = ilp[name].copy()
            if name == "tokens_per_s_all_fast":
                values[ilp["all_fast_fits"] < 0.5] = np.nan
            top.plot(budget, values, color=color, linestyle=line, marker=marker, label=label)
        if "greedy" in solvers:
            color, line, marker = GREEDY_STYLE
            greedy = solvers["greedy"]
            top.plot(greedy["budget_gib"], greedy["tokens_per_s_powerinfer"], color=color, linestyle=line,
                     marker=marker, label="PowerInfer, greedy placement")
        memory = result["metrics"].get(f"{hardware}_gpu_memory_gib")
        if memory is not None and memory <= budget.max():
            for ax in (top, bottom):
                ax.axvline(memory, color="0.5", linewidth=0.8, linestyle="--")
            top.annotate(f"{hardware}'s GPU memory", (memory, 1), xycoords=("data", "axes fraction"), fontsize=7,
                         ha="right", va="top", rotation=90, color="0.4")
        top.set_yscale("log")
        top.set_ylabel("projected decode tokens/s")
        top.set_title(f"{result['metrics'].get('model_shape', '')} on {hardware}")
        top.grid(True, which="both", alpha=0.3)
        top.legend(fontsize=7)
        bottom.plot(budget, 100 * ilp["fast_firing_share"], color="tab:blue", marker="o", label="ILP")
        if "greedy" in solvers:
            bottom.plot(solvers["greedy"]["budget_gib"], 100 * solvers["greedy"]["fast_firing_share"],
                        color=GREEDY_STYLE[0], linestyle="--", marker="x", label="greedy")
        bottom.set_ylabel("firings served on the GPU (%)")
        bottom.set_xlabel("GPU memory budget (GiB)")
        bottom.set_ylim(0, 100)
        bottom.grid(True, alpha=0.3)
        bottom.legend(fontsize=7)
    fig.suptitle("Projections of the cost model (sparse_lm.roofline), not measurements", fontsize=9)
    return fig
