"""Result records of training runs: one run (e.g. a ReLU-fication) or a sweep of runs (the FFN study)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparse_lm.results import write_result

TRAIN_COLUMNS = ("step", "tokens", "loss", "sparsity", "l1_coefficient", "lr")
EVAL_COLUMNS = ("step", "tokens", "val_perplexity", "sparsity")


def curves(records: Sequence[dict[str, Any]], label: str | None = None) -> dict[str, dict[str, Any]]:
    """Training and evaluation curves from history records, as result `series` (optionally labelled)."""
    prefix = [] if label is None else [label]
    head = [] if label is None else ["variant"]
    return {
        "train": {
            "columns": head + list(TRAIN_COLUMNS),
            "rows": [prefix + [r[c] for c in TRAIN_COLUMNS] for r in records if r["kind"] == "train"],
        },
        "eval": {
            "columns": head + list(EVAL_COLUMNS),
            "rows": [prefix + [r[c] for c in EVAL_COLUMNS] for r in records if r["kind"] == "eval"],
        },
    }


def write_train_result(cfg, summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> Path:
    """`results/<record_as>.json` for one run: before / start / after perplexity and sparsity, with curves."""
    metrics: dict[str, Any] = {"activation": summary["activation"], "params": summary["params"]}
    if "baseline_val_perplexity" in summary:
        metrics["before_activation"] = summary["baseline_activation"]
        metrics["before_val_perplexity"] = summary["baseline_val_perplexity"]
        metrics["before_sparsity"] = summary["baseline_sparsity"]
    if "start_val_perplexity" in summary:
        metrics["swapped_val_perplexity"] = summary["start_val_perplexity"]
        metrics["swapped_sparsity"] = summary["start_sparsity"]
    metrics.update({
        "after_val_perplexity": summary["val_perplexity"],
        "after_sparsity": summary["sparsity"],
        **{k: v for k, v in summary.items() if k.startswith(("perplexity_top", "val_perplexity_"))},
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "tokens_per_s": summary.get("tokens_per_s", float("nan")),
    })
    for key in ("mfu", "matmul_peak_gflops", "flops_per_token"):
        if key in summary:
            metrics[key] = summary[key]
    for key, value in summary.get("recipe", {}).items():
        metrics[f"recipe_{key}"] = value
    evals = [r for r in records if r["kind"] == "eval"]
    table = {
        "title": "Validation during training",
        "columns": ["step", "tokens", "val perplexity", "sparsity (exact zeros)"],
        "rows": [[r["step"], r["tokens"], r["val_perplexity"], r["sparsity"]] for r in evals],
    }
    notes = (
        "Sparsity is the share of FFN hidden activations that are exactly zero on the validation rows, "
        "averaged over layers. `swapped_*` is the pretrained model right after the activation swap, before "
        "any training; `before_*` the original model."
    )
    return write_result(
        cfg.record_as, metrics, command=summary["command"], title=f"Training: {cfg.name}", notes=notes,
        tables=[table], series=curves(records), results_dir=cfg.results_dir,
    )


SCRATCH_TITLE = "From-scratch FFN-variant study"
SCRATCH_TABLE = "FFN variants trained from scratch (same data, tokens and seed)"
SCRATCH_NOTES = (
    "`sparsity`: share of FFN hidden activations exactly zero on the validation rows (SwiGLU has none). "
    "`perplexity_top90`: validation perplexity when each token keeps only its 10% largest |a| per layer. "
    "Ungated FFNs (relu, relu2) have d_ff x 1.5 so every variant has the same parameter count."
)


def collect_sweep(
    sweep_dir: str | Path, record_as: str, results_dir: str | Path, command: str, *, title: str = SCRATCH_TITLE,
    table_title: str = SCRATCH_TABLE, notes: str = SCRATCH_NOTES,
) -> Path:
    """`results/<record_as>.json` from every finished run (a folder with summary.json) under `sweep_dir`, one row
    per run named by its folder (the swept value)."""
    sweep_dir = Path(sweep_dir)
    runs = sorted(p.parent for p in sweep_dir.glob("*/summary.json"))
    if not runs:
        raise FileNotFoundError(f"no finished run (summary.json) under {sweep_dir}")
    rows, series_train, series_eval, metrics = [], [], [], {}
    columns = ["variant", "params", "tokens", "val_perplexity", "val_perplexity_web", "val_perplexity_pydocs",
               "sparsity", "perplexity_top90", "tokens_per_s", "mfu"]
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        variant = run.name  # the sweep's subdir: the swept value (activation, recipe, learning rate)
        nan = float("nan")
        rows.append([variant, summary["params"], summary["tokens"], summary["val_perplexity"],
                     summary.get("val_perplexity_web", nan), summary.get("val_perplexity_pydocs", nan),
                     summary["sparsity"], summary.get("perplexity_top90", float("nan")),
                     summary.get("tokens_per_s", float("nan")), summary.get("mfu", float("nan"))])
        for key in ("val_perplexity", "sparsity", "perplexity_top90"):
            metrics[f"{variant}_{key}"] = summary.get(key, float("nan"))
        # a pretrained model's swap: the original's perplexity on the same validation rows, beside every row
        if "baseline_val_perplexity" in summary:
            metrics.setdefault("original_val_perplexity", summary["baseline_val_perplexity"])
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
        run_curves = curves(history, variant)
        series_train += run_curves["train"]["rows"]
        series_eval += run_curves["eval"]["rows"]
    table = {"title": table_title, "columns": columns, "rows": rows}
    head = ["variant"]
    return write_result(
        record_as, metrics, command=command, title=title, notes=notes, tables=[table],
        series={
            "train": {"columns": head + list(TRAIN_COLUMNS), "rows": series_train},
            "eval": {"columns": head + list(EVAL_COLUMNS), "rows": series_eval},
        },
        results_dir=results_dir,
    )
