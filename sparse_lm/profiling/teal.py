"""Training-free activation sparsity (TEAL/CATS style): per-layer magnitude thresholds on the FFN hidden
activation, calibrated for target sparsities, and the perplexity each costs.

The threshold zeroes |a| <= t_layer in the FFN hidden activation (the input of W_down), calibrated on other
documents than the ones scored. TEAL also sparsifies the inputs of the other matrices; this measures the
FFN-hidden part only, the one a neuron-sparse FFN kernel can exploit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from sparse_lm.data import DataConfig, pack_sequences, split_tokens
from sparse_lm.eval.perplexity import perplexity
from sparse_lm.models.loading import ModelSpec, build_model
from sparse_lm.models.transformer import Transformer
from sparse_lm.profiling.firing import FiringConfig
from sparse_lm.profiling.profiler import calibrate_thresholds, collect_abs_activations, profile_sequences
from sparse_lm.profiling.run import calibration_data
from sparse_lm.results import current_command, write_result
from sparse_lm.tracking import TrackerConfig, make_tracker
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.utils.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class TealConfig:
    """Attributes:
    targets: calibration sparsities to evaluate, each in [0, 1).
    calibration_tokens: tokens of other documents the thresholds are calibrated on.
    context, max_tokens, batch_size: perplexity windows and how many tokens of the split are scored.
    sparsity_batches: batches of the scored split on which the achieved sparsity is measured.
    """

    targets: tuple[float, ...] = (0.0, 0.25, 0.4, 0.5, 0.65, 0.8)
    calibration_tokens: int = 4096
    context: int = 512
    max_tokens: int | None = 16384
    batch_size: int = 4
    sparsity_batches: int = 2
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(float(t) for t in self.targets))
        if not self.targets or any(not 0 <= t < 1 for t in self.targets):
            raise ValueError(f"teal.targets must be sparsities in [0, 1), got {self.targets}")
        if self.calibration_tokens < 1 or self.context < 2 or self.batch_size < 1:
            raise ValueError("teal.calibration_tokens, teal.context and teal.batch_size must be positive")


@dataclasses.dataclass(frozen=True)
class TealRunConfig:
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teal: TealConfig = dataclasses.field(default_factory=TealConfig)
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    record_as: str | None = None
    results_dir: str = "results"


def set_thresholds(model: Transformer, thresholds: np.ndarray | None) -> None:
    for layer, block in enumerate(model.blocks):
        block.ffn.threshold = None if thresholds is None else float(thresholds[layer])


def run(cfg: TealRunConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_jsonable(cfg))
    tracker = make_tracker(cfg.tracker, run_dir, run_config=to_jsonable(cfg), run_name=run_dir.name)
    teal = cfg.teal
    with tracker:
        model, tokenizer = build_model(cfg.model)
        calibration_tokens = split_tokens(calibration_data(cfg.data), tokenizer, progress=teal.progress)
        calibration = pack_sequences(calibration_tokens, teal.context).tokens
        if len(calibration) == 0:
            raise ValueError(f"the calibration split has {len(calibration_tokens)} tokens: less than one window")
        activations = collect_abs_activations(model, calibration, teal.calibration_tokens, teal.batch_size)
        scored = split_tokens(cfg.data, tokenizer, progress=teal.progress)
        if teal.max_tokens is not None:
            scored = scored[: teal.max_tokens]
        scored_windows = pack_sequences(scored, teal.context).tokens
        rows, dense_nll = [], None
        for target in sorted(teal.targets):
            thresholds = calibrate_thresholds(activations, target)
            set_thresholds(model, thresholds if target > 0 else None)
            result = perplexity(model, scored, context=teal.context, batch_size=teal.batch_size,
                                progress=teal.progress)
            achieved = float("nan")
            n_batches = min(teal.sparsity_batches, len(scored_windows) // teal.batch_size)
            if n_batches:
                # |a| > 0 with zero thresholds: a neuron counts as active unless the calibrated threshold zeroed it
                counts, _, _ = profile_sequences(
                    model, scored_windows[: n_batches * teal.batch_size], FiringConfig(thresholds=(0.0,)),
                    np.zeros(model.config.n_layers), batch_size=teal.batch_size, progress=False,
                )
                achieved = 1.0 - float(np.mean(counts.counts)) / counts.tokens
            if dense_nll is None:
                dense_nll = result.nll
            rows.append([target, achieved, result.perplexity, result.nll,
                         100 * (np.exp(result.nll - dense_nll) - 1)])
            tracker.log({"target_sparsity": target, "achieved_sparsity": achieved, "perplexity": result.perplexity})
        set_thresholds(model, None)
        summary = {
            "model": model.config.name, "corpus": cfg.data.corpus.value, "split": cfg.data.split.value,
            "scored_tokens": int(len(scored) - 1), "context": teal.context,
            "targets": [r[0] for r in rows], "achieved_sparsity": [r[1] for r in rows],
            "perplexity": [r[2] for r in rows], "nll": [r[3] for r in rows],
            "perplexity_increase_percent": [r[4] for r in rows],
        }
        atomic_write_json(run_dir / "summary.json", to_jsonable(summary))
        tracker.log_summary({"dense_perplexity": rows[0][2]})
    if cfg.record_as:
        flat = {"model": summary["model"], "corpus": summary["corpus"], "split": summary["split"],
                "scored_tokens": summary["scored_tokens"], "context": teal.context}
        for target, _, ppl, _, increase in rows:
            flat[f"perplexity_at_{round(100 * target)}"] = ppl
            flat[f"increase_percent_at_{round(100 * target)}"] = increase
        write_result(
            cfg.record_as, flat, command=current_command(),
            title=f"Training-free FFN sparsity (TEAL/CATS style) on {summary['model']}: perplexity vs sparsity",
            tables=[{"title": "Perplexity per target sparsity",
                     "columns": ["target_sparsity", "achieved_sparsity", "perplexity", "nll", "increase_percent"],
                     "rows": rows}],
            notes=(f"Per-layer thresholds on |a| (FFN hidden activation) calibrated on {teal.calibration_tokens} "
                   "tokens of other documents; achieved sparsity is the fraction of hidden activations that are "
                   f"zero on {teal.sparsity_batches} batches of the scored split. Perplexity over the first "
                   f"{summary['scored_tokens'] + 1} tokens of {summary['corpus']}/{summary['split']}, context "
                   f"{teal.context}. TEAL reports 40-50% model-wide sparsity with small degradation; CATS 50% "
                   "within 1-2% (paper numbers, other models)."),
            results_dir=cfg.results_dir,
        )
    return summary
