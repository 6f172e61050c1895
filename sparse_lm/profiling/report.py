"""A profile run's result file (results/<name>.json) from its saved counts, so figures need no model run.

`python -m sparse_lm.profiling.report RUN_DIR --record-as NAME` rebuilds it from `summary.json`,
`config.json` and `counts_total.npz` of a finished profile run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse_lm.data import DataConfig, corpus_fingerprint
from sparse_lm.profiling import stats
from sparse_lm.profiling.counts import FiringCounts
from sparse_lm.profiling.powerlaw_fit import firing_frequency_samples
from sparse_lm.results import write_result

CURVE_POINTS = np.linspace(0.0, 1.0, 21)


def flat_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Scalars of the summary (per-layer lists go into tables)."""
    flat = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
    for corpus, digest in summary.get("corpus_sha256", {}).items():
        flat[f"{corpus}_sha256"] = digest
    for corpus in summary["corpora"]:
        for key, value in summary[corpus].items():
            if isinstance(value, int | float):
                flat[f"{corpus}_{key}"] = value
    for key, value in summary["powerlaw"].items():
        if isinstance(value, dict):
            for sub, item in value.items():
                if isinstance(item, int | float | str):
                    flat[f"powerlaw_{key}_{sub}"] = item
        elif isinstance(value, int | float | str):
            flat[f"powerlaw_{key}"] = value
    return flat


def layer_table(summary: dict[str, Any]) -> dict[str, Any]:
    columns = ["layer", "threshold", "sparsity", "coverage80", "gini"]
    per_layer = [summary["thresholds"], summary["sparsity_per_layer"], summary["coverage80_per_layer"],
                 summary["gini_per_layer"]]
    for corpus in summary["corpora"]:
        columns.append(f"sparsity_{corpus}")
        per_layer.append(summary[corpus]["sparsity_per_layer"])
    for key in sorted(k for k in summary if k.startswith("sparsity_per_layer_")):
        columns.append(key.replace("sparsity_per_layer_", "sparsity_"))
        per_layer.append(summary[key])
    if "hot_overlap_per_layer" in summary:
        columns.append("hot20_overlap")
        per_layer.append(summary["hot_overlap_per_layer"])
    rows = [[layer, *(column[layer] for column in per_layer)] for layer in range(len(summary["thresholds"]))]
    return {"title": "Per layer", "columns": columns, "rows": rows}


def coverage_table(counts: np.ndarray) -> dict[str, Any]:
    """Share of all firings held by the top x of neurons, per layer and model-wide, at x = 0, 0.05, ..., 1."""
    columns = ["neuron_fraction", *(f"layer_{i}" for i in range(len(counts))), "model"]
    curves = [stats.coverage_curve(layer) for layer in counts] + [stats.coverage_curve(counts.ravel())]
    shares = [np.interp(CURVE_POINTS, fraction, share) for fraction, share in curves]
    rows = [[float(x), *(float(s[i]) for s in shares)] for i, x in enumerate(CURVE_POINTS)]
    return {"title": "Coverage curves (share of firings held by the top fraction of neurons)", "columns": columns,
            "rows": rows}


def ccdf_table(counts: np.ndarray, points: int = 60) -> dict[str, Any]:
    """Empirical P(count >= x) of per-neuron firing counts (zeros dropped), at log-spaced x."""
    samples = np.sort(firing_frequency_samples(counts))
    grid = np.unique(np.round(np.geomspace(samples[0], samples[-1], points)).astype(np.int64))
    ccdf = 1.0 - np.searchsorted(samples, grid, side="left") / len(samples)
    return {"title": "Firing-count distribution (complementary CDF, neurons that fired at least once)",
            "columns": ["count", "ccdf"], "rows": [[int(x), float(p)] for x, p in zip(grid, ccdf, strict=True)]}


def profile_notes(firing: dict[str, Any]) -> str:
    calibrated = firing["rule"] == "magnitude" and firing.get("thresholds") is None
    return (
        f"Firing rule `{firing['rule']}`"
        + (f", per-layer thresholds calibrated to {firing['target_sparsity']:.0%} sparsity on "
           f"{firing['calibration_tokens']} tokens of other documents" if calibrated else "")
        + ". Sparsity is the mean fraction of neurons not firing per token. coverage80 is the smallest fraction "
        "of neurons holding 80% of all firings (PowerInfer reports 26% for OPT-30B, 43% for LLaMA2-ReGLU-70B, "
        "69% for LLaMA2-SwiGLU-70B per MLP). The power law is fitted to per-neuron firing counts of all layers "
        "pooled, by maximum likelihood with x_min chosen by the KS distance (the `powerlaw` package), and "
        "compared with alternatives by log-likelihood ratio R (R > 0 favours the power law; a verdict needs "
        "p < 0.1). hot20_overlap is the share of a layer's top-20% neurons on one corpus that are also top-20% "
        "on the other (PowerInfer reports > 90% across tasks)."
    )


def write_profile_result(
    name: str, summary: dict[str, Any], firing: dict[str, Any], total: np.ndarray, *, command: str,
    results_dir: str | Path = "results",
) -> Path:
    return write_result(
        name, flat_metrics(summary), command=command,
        title=f"Activation profile of {summary['model']} ({summary['firing_rule']} rule, "
        f"{' + '.join(summary['corpora'])})",
        tables=[layer_table(summary), coverage_table(total), ccdf_table(total)],
        notes=profile_notes(firing), results_dir=results_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--record-as", required=True)
    parser.add_argument("--results-dir", default="results")
    args = parser.parse_args(argv)
    for required in ("summary.json", "config.json", "counts_total.npz"):
        if not (args.run_dir / required).exists():
            parser.error(f"{args.run_dir / required} is missing: is {args.run_dir} a finished profile run?")
    summary = json.loads((args.run_dir / "summary.json").read_text())
    config = json.loads((args.run_dir / "config.json").read_text())
    if "corpus_sha256" not in summary:  # runs made before the summary carried them: hash the sources now
        data = DataConfig(**{k: v for k, v in config["data"].items()})
        summary["corpus_sha256"] = {c: corpus_fingerprint(data.replace(corpus=c, path=None if c != data.corpus.value
                                                                       else data.path)) for c in summary["corpora"]}
    total = FiringCounts.load(args.run_dir / "counts_total.npz").counts
    command = "python -m sparse_lm.profiling.report " + shlex.join(argv if argv is not None else sys.argv[1:])
    path = write_profile_result(args.record_as, summary, config["firing"], total, command=command,
                                results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
