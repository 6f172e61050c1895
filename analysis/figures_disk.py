"""Figure of the disk tier (bench_disk_tier* results): decode tokens/s of the neuron cache and of naive whole-layer
loading against the RAM budget, with the all-in-RAM engine as the ceiling, and the hit rate of each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from figure_registry import columns, register, save, table
from matplotlib.figure import Figure

from sparse_lm.utils.machine import describe_machine

BUDGET_TABLE = "Per budget"
SPEED_LINES = (  # (column, label, colour, line, marker)
    ("tokens_per_s_cache", "neuron cache (hot + LRU, read-ahead)", "tab:blue", "-", "o"),
    ("tokens_per_s_naive", "naive: whole layers on demand", "tab:orange", "-", "s"),
    ("tokens_per_s_ram", "all FFN rows in RAM (ceiling)", "0.4", ":", ""),
)
HIT_LINES = (("hit_rate_cache", "neuron cache", "tab:blue", "o"), ("hit_rate_naive", "naive", "tab:orange", "s"))


def disk_tier_series(result: dict[str, Any]) -> dict[str, np.ndarray]:
    """The per-budget columns as float arrays sorted by budget."""
    cols = columns(table(result, BUDGET_TABLE))
    needed = ["budget_fraction"] + [c for c, *_ in SPEED_LINES] + [c for c, *_ in HIT_LINES] + ["speedup"]
    missing = [c for c in needed if c not in cols]
    if missing:
        raise ValueError(f"result {result['name']!r}: the per-budget table lacks {missing}")
    order = np.argsort(np.asarray(cols["budget_fraction"], float))
    if len(order) == 0:
        raise ValueError(f"result {result['name']!r} has no budget rows")
    optional = [c for c in ("hit_rate_without_read_ahead_cache",) if c in cols]
    return {c: np.asarray(cols[c], float)[order] for c in needed + optional}


@register("bench_disk_tier")
def draw_disk_tier(result: dict[str, Any], out_dir: Path) -> list[Path]:
    data = disk_tier_series(result)
    budget = 100 * data["budget_fraction"]
    fig = Figure(figsize=(6.4, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for column, label, color, line, marker in SPEED_LINES:
        top.plot(budget, data[column], color=color, linestyle=line, marker=marker, label=label)
    for x, y, speedup in zip(budget, data["tokens_per_s_cache"], data["speedup"], strict=True):
        top.annotate(f"{speedup:.1f}x naive", (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                     fontsize=8, color="tab:blue")
    top.set_ylim(0, 1.15 * np.nanmax([data[c] for c, *_ in SPEED_LINES]))
    top.set_ylabel("decode tokens/s (higher is better)")
    top.legend(fontsize=8, loc="upper left")
    for column, label, color, marker in HIT_LINES:
        bottom.plot(budget, 100 * data[column], color=color, marker=marker, label=label)
    if "hit_rate_without_read_ahead_cache" in data:
        bottom.plot(budget, 100 * data["hit_rate_without_read_ahead_cache"], color="tab:blue", linestyle="--",
                    marker=".", label="neuron cache, not counting read-ahead")
    bottom.set_ylim(0, 105)
    bottom.set_ylabel("hit rate (%)")
    bottom.set_xlabel("RAM for FFN rows (% of the FFN weights)")
    bottom.legend(fontsize=8, loc="lower right")
    for ax in (top, bottom):
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(alpha=0.3)
    metrics = result["metrics"]
    fig.suptitle(f"Disk tier, {metrics.get('model', '')}: FFN rows read with O_DIRECT "
                 f"({metrics.get('disk_sequential_gb_per_s', float('nan')):.2f} GB/s sequential, "
                 f"{metrics.get('disk_random_reads_per_s', float('nan')) / 1e3:.0f}k random reads/s)", fontsize=9)
    if result.get("machine"):
        fig.supxlabel(describe_machine(result["machine"]), fontsize=7, color="0.4")
    return save(fig, out_dir, result["name"])
