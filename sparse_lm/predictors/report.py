"""One result record from a Hydra sweep of predictor runs (loss, hidden activation, firing rule, rank...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_lm.results import write_result

SWEEP_COLUMNS = (
    "recall_mean", "precision_mean", "true_active_mean", "predicted_active_mean", "predicted_over_true",
    "budget_recall_mean", "missed_mass_mean", "perplexity_dense", "perplexity_predicted", "perplexity_change",
    "predictor_params",
)


def run_label(config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What distinguishes one predictor run of a sweep from another."""
    predictor = config["predictor"]
    ranks = sorted(set(summary["ranks"]))
    return {
        "firing": summary["firing_rule"] + (
            f"@{config['firing']['target_sparsity']}" if summary["firing_rule"] in ("topk", "magnitude") else ""),
        "hidden": predictor["hidden_activation"],
        "loss": predictor["loss"] + (f"(gamma {predictor['focal_gamma']})" if predictor["loss"] == "focal" else ""),
        "epochs": predictor["epochs"],
        "rank": ranks[0] if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}",
    }


def collect_predictor_sweep(sweep_dir: str | Path, record_as: str, results_dir: str | Path, command: str) -> Path:
    """`<results_dir>/<record_as>.json` with one row per finished run (summary.json and config.json) under
    `sweep_dir`, in the sweep's job order."""
    sweep_dir = Path(sweep_dir)
    runs = sorted((p.parent for p in sweep_dir.glob("*/summary.json")),
                  key=lambda p: (int(p.name) if p.name.isdigit() else 0, p.name))
    if not runs:
        raise FileNotFoundError(f"no finished run (summary.json) under {sweep_dir}")
    rows, labels = [], []
    for run in runs:
        config_path = run / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} is missing: not a train_predictor run")
        summary = json.loads((run / "summary.json").read_text())
        label = run_label(json.loads(config_path.read_text()), summary)
        labels.append(label)
        rows.append([*label.values(), *(summary[k] for k in SWEEP_COLUMNS)])
    model = json.loads((runs[0] / "summary.json").read_text())["model"]
    best = min(range(len(rows)), key=lambda i: rows[i][len(labels[i]) + SWEEP_COLUMNS.index("predicted_over_true")])
    metrics = {"model": model, "runs": len(rows),
               "best_predicted_over_true": rows[best][len(labels[best]) + SWEEP_COLUMNS.index("predicted_over_true")],
               "best_run": " ".join(f"{k}={v}" for k, v in labels[best].items())}
    table = {"title": "Predictor sweep: one row per run", "columns": [*labels[0], *SWEEP_COLUMNS], "rows": rows}
    notes = (
        "Each row is one run of experiments/train_predictor.py in the sweep (same model, data and pairs per "
        "firing rule). Recall is calibrated to the run's target on half of the validation pairs and measured on "
        "the other half; `predicted_over_true` = predicted / truly active neurons; `budget_recall` = recall when "
        "predicting 1.25x the firing cells; perplexity with every FFN gated by its predictor."
    )
    return write_result(record_as, metrics, command=command, title=f"Predictor sweep: {model}", notes=notes,
                        tables=[table], results_dir=results_dir)
