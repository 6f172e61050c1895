"""The perplexity-sparsity frontier figure: one panel per corpus, perplexity increase against FFN sparsity for
every method (training-free rules as lines over their targets, trained models as points)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from figure_registry import register, save, table
from matplotlib.figure import Figure

CORPORA = ("web", "pydocs")
STYLES = {"teal": "o-", "teal_greedy": "s--", "cats": "^-", "stat_topk": "v-", "wina": "D-"}


def frontier_figure(result: dict[str, Any]) -> Figure:
    tab = table(result, "Perplexity against FFN sparsity")
    column = {name: i for i, name in enumerate(tab["columns"])}
    missing = [c for c in ("method", "target", *(f"{k}_{c}" for c in CORPORA for k in ("sparsity", "increase_percent")))
               if c not in column]
    if missing:
        raise ValueError(f"result {result['name']!r}: frontier table lacks columns {missing}")
    rows = tab["rows"]
    metrics = result["metrics"]
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    for index, corpus in enumerate(CORPORA):
        ax = fig.add_subplot(1, 2, index + 1)
        methods = dict.fromkeys(r[column["method"]] for r in rows if r[column["method"]] != "dense")
        for method in methods:
            own = [r for r in rows if r[column["method"]] == method]
            xs = [100 * r[column[f"sparsity_{corpus}"]] for r in own]
            ys = [max(r[column[f"increase_percent_{corpus}"]], 0.1) for r in own]
            trained = all(math.isnan(r[column["target"]]) for r in own)
            if trained:
                ax.plot(xs, ys, "*", ms=12, label=f"{method} (trained)")
            else:
                ax.plot(xs, ys, STYLES.get(method, "o-"), ms=4, label=method)
        ax.axhline(10, color="grey", ls=":", lw=1)
        ax.text(1, 10.5, "+10%", color="grey", fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("FFN sparsity (%)")
        ax.set_ylabel("perplexity increase over dense (%)")
        ax.set_title(f"{corpus}: dense perplexity {metrics[f'dense_perplexity_{corpus}']:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
        if index == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"Perplexity-sparsity frontier ({metrics['tokens_per_corpus']:,} validation tokens per corpus, "
                 f"context {metrics['context']})", fontsize=10)
    return fig


@register("frontier")
def draw_frontier(result: dict[str, Any], out_dir: Path) -> list[Path]:
    return save(frontier_figure(result), out_dir, result["name"])
