"""Figure of the cost-model validation (cost_model_validation* results): PowerInfer's paper numbers beside the
roofline projections, one bar pair per case, one panel per metric (speedup over llama.cpp, ratio to an A100,
tokens/s), with the relative error over each pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from figure_registry import columns, register, save, table
from matplotlib.figure import Figure

CASE_TABLE = "Paper vs projected per case"
PANELS = (  # (metric, axis label)
    ("speedup", "speedup over llama.cpp (x)"),
    ("ratio_to_a100", "rate / A100's rate"),
    ("tokens_per_s", "PowerInfer tokens/s"),
)
PAPER_COLOR, PROJECTED_COLOR, MISS_COLOR = "0.6", "tab:blue", "tab:red"


def validation_cases(result: dict[str, Any]) -> dict[str, dict[str, np.ndarray | list]]:
    """Per metric, the case names (a fitted case marked "(fitted)") and the paper, projected and relative-error
    columns, in table order."""
    cols = columns(table(result, CASE_TABLE))
    missing = [c for c in ("case", "metric", "paper", "projected", "relative_error") if c not in cols]
    if missing:
        raise ValueError(f"result {result['name']!r}: the case table lacks columns {missing}")
    out = {}
    for metric, _ in PANELS:
        rows = [i for i, m in enumerate(cols["metric"]) if m == metric]
        if rows:
            fitted = cols.get("fitted", [False] * len(cols["case"]))
            out[metric] = {"case": [cols["case"][i] + (" (fitted)" if fitted[i] else "") for i in rows],
                           **{k: np.array([cols[k][i] for i in rows], float)
                              for k in ("paper", "projected", "relative_error")}}
    if not out:
        raise ValueError(f"result {result['name']!r} has no case of a known metric")
    return out


@register("cost_model_validation")
def draw_cost_model_validation(result: dict[str, Any], out_dir: Path) -> list[Path]:
    return save(validation_figure(result), out_dir, result["name"])


def validation_figure(result: dict[str, Any]) -> Figure:
    """Horizontal bar pairs (paper grey, projected blue, or red when outside the tolerance) per metric panel."""
    cases = validation_cases(result)
    tolerance = result["metrics"].get("tolerance", 0.3)
    heights = [len(cases[m]["case"]) + 1.5 for m, _ in PANELS if m in cases]
    fig = Figure(figsize=(8, 0.45 * sum(heights) + 1.2), layout="constrained")
    axes = fig.subplots(len(heights), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)[:, 0]
    for ax, (metric, label) in zip(axes, [p for p in PANELS if p[0] in cases], strict=True):
        data = cases[metric]
        y = np.arange(len(data["case"]))
        ax.barh(y - 0.2, data["paper"], height=0.4, color=PAPER_COLOR, label="paper (PowerInfer)")
        colors = [PROJECTED_COLOR if abs(e) <= tolerance else MISS_COLOR for e in data["relative_error"]]
        ax.barh(y + 0.2, data["projected"], height=0.4, color=colors, label="projected (cost model)")
        for row, (value, error) in enumerate(zip(data["projected"], data["relative_error"], strict=True)):
            ax.annotate(f"{value:.3g} ({error:+.0%})", (value, row + 0.2), textcoords="offset points",
                        xytext=(3, 0), va="center", fontsize=7)
        ax.set_yticks(y, data["case"], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.3 * max(np.nanmax(data["paper"]), np.nanmax(data["projected"])))
        ax.set_xlabel(label)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(loc="lower right", fontsize=7)
    metrics = result["metrics"]
    fitted = metrics.get("fitted_case")
    counted = metrics.get("cases", 0) - (1 if fitted else 0)
    fig.suptitle(f"Roofline cost model vs PowerInfer's published numbers: {metrics.get('cases_within_tolerance')} "
                 f"of {counted} {'unfitted ' if fitted else ''}cases within {tolerance:.0%} (red: outside)"
                 + (f"\none constant fitted on {fitted}" if fitted else ""), fontsize=9)
    return fig
