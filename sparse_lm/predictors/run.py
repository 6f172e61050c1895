"""The train_predictor task: dataset of (FFN input, firing mask) pairs, one predictor per layer, thresholds
calibrated to a recall target, per-layer metrics, and perplexity with every FFN gated by its predictor."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sparse_lm.data import DataConfig, Split, split_tokens
from sparse_lm.eval.perplexity import perplexity
from sparse_lm.models.loading import ModelSpec, build_model
from sparse_lm.models.transformer import count_params
from sparse_lm.predictors.dataset import collect, open_dataset
from sparse_lm.predictors.module import PredictorSet, ffn_params
from sparse_lm.predictors.store import attach, save_predictors
from sparse_lm.predictors.train import PredictorTrainConfig, calibrate, measure, train_layer
from sparse_lm.profiling.firing import FiringConfig
from sparse_lm.profiling.run import ProfileConfig, corpus_sequences, firing_thresholds
from sparse_lm.results import current_command, write_result
from sparse_lm.tracking import TrackerConfig, make_tracker
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.utils.io import atomic_write_json


@dataclasses.dataclass(frozen=True)
class PredictorDataConfig:
    """Attributes:
    train_tokens, validation_tokens: tokens of the train and validation splits turned into pairs (rounded down
      to whole batches); validation pairs also keep |a| for the missed-mass metric.
    folder: where the shards go; "" puts them in the run directory (`dataset/`). Runs with the same model,
      data, rule and sizes can share a folder.
    """

    train_tokens: int = 65536
    validation_tokens: int = 16384
    seq_len: int = 256
    batch_size: int = 4
    batches_per_shard: int = 16
    folder: str = ""

    def __post_init__(self):
        for field in ("train_tokens", "validation_tokens", "seq_len", "batch_size", "batches_per_shard"):
            if getattr(self, field) < 1:
                raise ValueError(f"dataset.{field} must be >= 1, got {getattr(self, field)}")


@dataclasses.dataclass(frozen=True)
class PredictorRunConfig:
    """Schema of `conf/train_predictor.yaml`. `ranks`: one rank for every layer, or one per layer."""

    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(split=Split.train))
    firing: FiringConfig = dataclasses.field(default_factory=FiringConfig)
    dataset: PredictorDataConfig = dataclasses.field(default_factory=PredictorDataConfig)
    predictor: PredictorTrainConfig = dataclasses.field(default_factory=PredictorTrainConfig)
    ranks: tuple[int, ...] = (64,)
    perplexity_tokens: int = 16384
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    progress: bool = True
    record_as: str | None = None
    results_dir: str = "results"

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {self.ranks}")
        if self.perplexity_tokens < 2:
            raise ValueError(f"perplexity_tokens must be >= 2, got {self.perplexity_tokens}")

    def layer_ranks(self, n_layers: int) -> tuple[int, ...]:
        if len(self.ranks) == 1:
            return self.ranks * n_layers
        if len(self.ranks) != n_layers:
            raise ValueError(f"ranks has {len(self.ranks)} values; give 1 or n_layers={n_layers}")
        return self.ranks


def _fingerprint(cfg: PredictorRunConfig, data: DataConfig, tokens: int, thresholds: np.ndarray) -> str:
    blob = json.dumps([to_jsonable(cfg.model), to_jsonable(data), to_jsonable(cfg.firing), tokens,
                       cfg.dataset.seq_len, cfg.dataset.batch_size, thresholds.tolist()])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_dataset(cfg: PredictorRunConfig, model, tokenizer, thresholds: np.ndarray, root: Path) -> dict[str, Path]:
    """Collects (or resumes) the train and validation shards; returns their folders."""
    ds = cfg.dataset
    folders = {}
    for split, tokens, with_abs in (("train", ds.train_tokens, False), ("validation", ds.validation_tokens, True)):
        data = cfg.data.replace(split=Split(split)) if cfg.data.corpus.value != "textfile" else cfg.data
        profile = ProfileConfig(tokens=tokens, seq_len=ds.seq_len, batch_size=ds.batch_size, progress=cfg.progress)
        sequences = corpus_sequences(data, tokenizer, profile)
        fingerprint = _fingerprint(cfg, data, tokens, thresholds)
        folder = root / f"{split}-{fingerprint}"
        collect(model, sequences, cfg.firing, thresholds, folder, batch_size=ds.batch_size,
                batches_per_shard=ds.batches_per_shard, with_abs=with_abs, fingerprint=fingerprint,
                progress=cfg.progress)
        folders[split] = folder
    return folders


def run(cfg: PredictorRunConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_jsonable(cfg))
    tracker = make_tracker(cfg.tracker, run_dir, run_config=to_jsonable(cfg), run_name=run_dir.name)
    with tracker:
        model, tokenizer = build_model(cfg.model)
        config = model.config
        ranks = cfg.layer_ranks(config.n_layers)
        profile = ProfileConfig(seq_len=cfg.dataset.seq_len, batch_size=cfg.dataset.batch_size, progress=cfg.progress)
        thresholds = firing_thresholds(model, tokenizer, cfg.firing, cfg.data, profile)
        root = Path(cfg.dataset.folder) if cfg.dataset.folder else run_dir / "dataset"
        folders = build_dataset(cfg, model, tokenizer, thresholds, root)
        _, train_shards = open_dataset(folders["train"])
        _, val_shards = open_dataset(folders["validation"])
        # thresholds are calibrated on one half of the validation shards and measured on the other
        calibration_shards, measure_shards = (val_shards[::2], val_shards[1::2]) if len(val_shards) > 1 else (
            val_shards, val_shards)
        predictors = PredictorSet(config, ranks, cfg.predictor.hidden_activation, rngs=nnx.Rngs(cfg.predictor.seed))
        per_layer: dict[str, list] = {k: [] for k in (
            "recall", "precision", "f1", "predicted_active", "true_active", "missed_mass", "threshold",
            "final_loss", "overhead")}
        overhead = predictors.overhead(config)
        decisions = np.zeros(config.n_layers, np.float32)
        bar = tqdm(range(config.n_layers), desc="predictors", unit="layer", disable=not cfg.progress)
        for layer in bar:
            predictor, losses = train_layer(train_shards, layer, config.d_model, config.d_ff, ranks[layer],
                                            cfg.predictor)
            threshold = calibrate(predictor, calibration_shards, layer, config.d_ff, cfg.predictor.target_recall)
            metrics = measure(predictor, threshold, measure_shards, layer, config.d_ff, with_abs=True)
            nnx.update(predictors.layers[layer], nnx.state(predictor))
            decisions[layer] = threshold
            for key in ("recall", "precision", "f1", "predicted_active", "true_active", "missed_mass"):
                per_layer[key].append(getattr(metrics, key))
            per_layer["threshold"].append(threshold)
            per_layer["final_loss"].append(losses[-1])
            per_layer["overhead"].append(overhead[layer])
            tracker.log({f"layer_{layer:02d}/{k}": v[-1] for k, v in per_layer.items()}, step=layer)
            bar.set_postfix(recall=f"{metrics.recall:.3f}", over=f"{metrics.predicted_over_true:.2f}")
        predictors.thresholds[...] = decisions
        save_predictors(run_dir / "predictors", predictors, config)

        val_data = cfg.data.replace(split=Split.validation) if cfg.data.corpus.value != "textfile" else cfg.data
        tokens = split_tokens(val_data, tokenizer, progress=cfg.progress)[: cfg.perplexity_tokens]
        dense = perplexity(model, tokens, context=cfg.dataset.seq_len, progress=cfg.progress)
        attach(model, predictors)
        gated = perplexity(model, tokens, context=cfg.dataset.seq_len, progress=cfg.progress)
        attach(model, None)
        predictor_total = sum(predictors.param_counts())
        summary: dict[str, Any] = {
            "model": config.name,
            "activation": config.activation.value,
            "firing_rule": cfg.firing.rule.value,
            "ranks": list(ranks),
            **per_layer,
            "recall_mean": float(np.mean(per_layer["recall"])),
            "precision_mean": float(np.mean(per_layer["precision"])),
            "predicted_active_mean": float(np.mean(per_layer["predicted_active"])),
            "true_active_mean": float(np.mean(per_layer["true_active"])),
            "predicted_over_true": float(np.sum(per_layer["predicted_active"]) / np.sum(per_layer["true_active"])),
            "missed_mass_mean": float(np.mean(per_layer["missed_mass"])),
            "overhead_max": float(np.max(overhead)),
            "perplexity_dense": dense.perplexity,
            "perplexity_predicted": gated.perplexity,
            "perplexity_change": gated.perplexity / dense.perplexity - 1,
            "predictor_params": predictor_total,
            "predictor_param_share": predictor_total / count_params(model),
            "ffn_param_share": predictor_total / (config.n_layers * ffn_params(config)),
            "train_pairs": sum(np.load(s / "x_0.npy", mmap_mode="r").shape[0] for s in train_shards),
            "command": current_command(),
        }
        tracker.log_summary({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
        atomic_write_json(run_dir / "summary.json", to_jsonable(summary))
    if cfg.record_as:
        write_predictor_result(cfg, summary)
    return summary


def write_predictor_result(cfg: PredictorRunConfig, summary: dict[str, Any]) -> Path:
    keys = ("recall", "precision", "predicted_active", "true_active", "missed_mass", "overhead")
    rows = [[layer, summary["ranks"][layer], *(summary[k][layer] for k in keys)]
            for layer in range(len(summary["recall"]))]
    metrics = {k: summary[k] for k in (
        "model", "activation", "firing_rule", "recall_mean", "precision_mean", "predicted_active_mean",
        "true_active_mean", "predicted_over_true", "missed_mass_mean", "overhead_max", "perplexity_dense",
        "perplexity_predicted", "perplexity_change", "predictor_params", "predictor_param_share", "train_pairs")}
    notes = (
        f"Thresholds calibrated per layer to recall {cfg.predictor.target_recall} on half of the validation "
        "pairs, measured on the other half. `predicted_active` / `true_active`: share of neurons predicted / "
        "firing per token. `missed_mass`: sum of |a| over firing neurons the predictor missed / sum of |a|. "
        "`overhead`: predictor FLOPs (= f32 bytes) / the dense FFN's. Perplexity: every FFN keeps only the "
        "neurons its predictor selects."
    )
    return write_result(
        cfg.record_as, metrics, command=summary["command"],
        title=f"Activation predictors: {summary['model']} ({summary['activation']}, {summary['firing_rule']} rule)",
        notes=notes,
        tables=[{"title": "Per layer", "columns": ["layer", "rank", *keys], "rows": rows}],
        results_dir=cfg.results_dir,
    )
