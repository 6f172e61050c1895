"""The perplexity-sparsity frontier figure: one panel per corpus, perplexity increase against FFN sparsity for
every method (training-free rules as lines over their targets, trained models as stars, one per checkpoint scored),
and, when the record carries training curves, a panel of validation perplexity against tokens trained beside the
original model's +10% mark (the distance and the slope)."""

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
    curves = [t for t in result.get("tables", []) if t["title"].startswith("Training curve of ")]
    panels = len(CORPORA) + (1 if curves else 0)
    fig = Figure(figsize=(5.5 * panels, 4.5), layout="constrained")
    for index, corpus in enumerate(CORPORA):
        ax = fig.add_subplot(1, panels, index + 1)
        methods = dict.fromkeys(r[column["method"]] for r in rows if r[column["method"]] != "dense")
        for method in methods:
            own = [r for r in rows if r[column["method"]] == method]
            xs = [100 * r[column[f"sparsity_{corpus}"]] for r in own]
            ys = [max(r[column[f"increase_percent_{corpus}"]], 0.1) for r in own]
            trained = all(math.isnan(r[column["target"]]) for r in own)
            if trained:
                ax.plot(xs, ys, "*:", ms=12, label=f"{method} (trained)")
            else:
                ax.plot(xs, ys, STYLES.get(method, "o-"), ms=4, label=method)
        ax.axhline(10, color="grey", ls=":", lw=1)
        ax.text(0.01, 10.5, "+10%", color="grey", fontsize=7, transform=ax.get_yaxis_transform())
        ax.set_yscale("log")
        ax.set_xlabel("FFN sparsity (%)")
        ax.set_ylabel("perplexity increase over dense (%)")
        ax.set_title(f"{corpus}: dense perplexity {metrics[f'dense_perplexity_{corpus}']:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
        if index == 0:
            ax.legend(fontsize=7)
    if curves:
        training_panel(fig.add_subplot(1, panels, panels), curves)
    fig.suptitle(f"Perplexity-sparsity frontier ({metrics['tokens_per_corpus']:,} validation tokens per corpus, "
                 f"context {metrics['context']})", fontsize=10)
    return fig


def training_panel(ax, curves: list[dict[str, Any]]) -> None:
    """Validation perplexity per corpus against tokens trained, one line pair per run, with +10% of the original."""
    for index, curve in enumerate(curves):
        colour = f"C{index % 10}"
        label = curve["title"].removeprefix("Training curve of ")
        col = {name: i for i, name in enumerate(curve["columns"])}
        trained = [r for r in curve["rows"] if r[col["tokens"]] != "original"]
        original = next((r for r in curve["rows"] if r[col["tokens"]] == "original"), None)
        for corpus, style in zip(CORPORA, ("-", "--"), strict=True):
            xs = [max(r[col["tokens"]], 1) for r in trained]
            ax.plot(xs, [r[col[f"val_perplexity_{corpus}"]] for r in trained], style, marker=".", color=colour,
                    label=f"{label}: {corpus}")
            if original is not None:
                ax.axhline(1.1 * original[col[f"val_perplexity_{corpus}"]], color=colour, ls=style, lw=0.8,
                           alpha=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("validation perplexity (training evaluation)")
    ax.set_title("ReLU-fication by tokens trained (thin lines: original + 10%)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


@register("frontier")
def draw_frontier(result: dict[str, Any], out_dir: Path) -> list[Path]:
    return save(frontier_figure(result), out_dir, result["name"])
