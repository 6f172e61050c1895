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
from sparse_lm.predictors.dataset import calibration_split, collect, firing_counts, open_dataset
from sparse_lm.predictors.metrics import LayerMetrics
from sparse_lm.predictors.module import PredictorSet
from sparse_lm.predictors.sizing import (
    allocate_ranks,
    choose_ranks,
    profile_guided_ranks,
    uniform_rank_of_equal_size,
)
from sparse_lm.predictors.store import attach, save_predictors
from sparse_lm.predictors.train import PredictorTrainConfig, calibrate, measure, train_layer
from sparse_lm.profiling import stats
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
class SizingConfig:
    """Adaptive sizing: with candidate ranks, every layer is fitted at each. Without `budget_rank`, the
    smallest rank within `max_over_true` is chosen per layer (`sizing.choose_ranks`) and a uniform rank of
    equal total size is fitted for comparison. With `budget_rank` (one of the candidates), the ranks maximising
    the mean recall at `max_over_true` x the firing cells under the total size of that uniform rank are chosen
    (`sizing.allocate_ranks`) and compared with it and with the ranks the profile alone suggests
    (`sizing.profile_guided_ranks`, same total size). Empty `candidate_ranks`: `ranks` as given."""

    candidate_ranks: tuple[int, ...] = ()
    max_over_true: float = 1.25
    budget_rank: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "candidate_ranks", tuple(sorted(int(r) for r in self.candidate_ranks)))
        if any(r < 1 for r in self.candidate_ranks):
            raise ValueError(f"sizing.candidate_ranks must be positive, got {self.candidate_ranks}")
        if self.max_over_true < 1:
            raise ValueError(f"sizing.max_over_true must be >= 1, got {self.max_over_true}")
        if self.budget_rank is not None and self.budget_rank not in self.candidate_ranks:
            raise ValueError(
                f"sizing.budget_rank={self.budget_rank} must be one of sizing.candidate_ranks {self.candidate_ranks}"
            )


@dataclasses.dataclass(frozen=True)
class PredictorRunConfig:
    """Schema of `conf/train_predictor.yaml`. `ranks`: one rank for every layer, or one per layer."""

    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(split=Split.train))
    firing: FiringConfig = dataclasses.field(default_factory=FiringConfig)
    dataset: PredictorDataConfig = dataclasses.field(default_factory=PredictorDataConfig)
    predictor: PredictorTrainConfig = dataclasses.field(default_factory=PredictorTrainConfig)
    ranks: tuple[int, ...] = (64,)
    sizing: SizingConfig = dataclasses.field(default_factory=SizingConfig)
    curve_recalls: tuple[float, ...] = (0.9, 0.99)
    perplexity_tokens: int = 16384
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    progress: bool = True
    record_as: str | None = None
    results_dir: str = "results"

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {self.ranks}")
        object.__setattr__(self, "curve_recalls", tuple(float(r) for r in self.curve_recalls))
        if any(not 0 < r <= 1 for r in self.curve_recalls):
            raise ValueError(f"curve_recalls must be in (0, 1], got {self.curve_recalls}")
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
        data = cfg.data.with_split(Split(split))
        profile = ProfileConfig(tokens=tokens, seq_len=ds.seq_len, batch_size=ds.batch_size, progress=cfg.progress)
        sequences = corpus_sequences(data, tokenizer, profile)
        fingerprint = _fingerprint(cfg, data, tokens, thresholds)
        folder = root / f"{split}-{fingerprint}"
        collect(model, sequences, cfg.firing, thresholds, folder, batch_size=ds.batch_size,
                batches_per_shard=ds.batches_per_shard, with_abs=with_abs, fingerprint=fingerprint,
                progress=cfg.progress)
        folders[split] = folder
    return folders


@dataclasses.dataclass
class FittedLayers:
    """Predictors fitted at given per-layer ranks, and their validation measurements."""

    predictors: PredictorSet
    metrics: list[LayerMetrics]  # at the recall-calibrated threshold
    budget_recall: list[float]  # recall when predicting max_over_true x the firing cells
    final_loss: list[float]


def fit_layers(
    cfg: PredictorRunConfig, config, ranks: tuple[int, ...], train_shards: list[Path], calibration_shards: list[Path],
    measure_shards: list[Path], label: str,
) -> FittedLayers:
    predictors = PredictorSet(config, ranks, cfg.predictor.hidden_activation, rngs=nnx.Rngs(cfg.predictor.seed))
    metrics, budget_recall, final_loss = [], [], []
    thresholds = np.zeros(config.n_layers, np.float32)
    bar = tqdm(range(config.n_layers), desc=f"predictors {label}", unit="layer", disable=not cfg.progress)
    for layer in bar:
        predictor, losses = train_layer(train_shards, layer, config.d_model, config.d_ff, ranks[layer], cfg.predictor)
        threshold, budget = calibrate(predictor, calibration_shards, layer, config.d_ff, cfg.predictor.target_recall,
                                      budget_ratio=cfg.sizing.max_over_true)
        layer_metrics = measure(predictor, threshold, measure_shards, layer, config.d_ff, with_abs=True)
        budget_recall.append(measure(predictor, budget, measure_shards, layer, config.d_ff, with_abs=False).recall)
        nnx.update(predictors.layers[layer], nnx.state(predictor))
        thresholds[layer] = threshold
        metrics.append(layer_metrics)
        final_loss.append(losses[-1])
        bar.set_postfix(recall=f"{layer_metrics.recall:.3f}", over=f"{layer_metrics.predicted_over_true:.2f}")
    predictors.thresholds[...] = thresholds
    return FittedLayers(predictors, metrics, budget_recall, final_loss)


def combine_layers(config, hidden_activation, chosen: tuple[int, ...], fitted: dict[int, FittedLayers]) -> FittedLayers:
    """Layer l from the fit at rank chosen[l]."""
    predictors = PredictorSet(config, chosen, hidden_activation, rngs=nnx.Rngs(0))
    thresholds = np.zeros(config.n_layers, np.float32)
    for layer, rank in enumerate(chosen):
        source = fitted[rank].predictors
        nnx.update(predictors.layers[layer], nnx.state(source.layers[layer]))
        thresholds[layer] = float(source.thresholds[...][layer])
    predictors.thresholds[...] = thresholds
    return FittedLayers(
        predictors,
        [fitted[r].metrics[layer] for layer, r in enumerate(chosen)],
        [fitted[r].budget_recall[layer] for layer, r in enumerate(chosen)],
        [fitted[r].final_loss[layer] for layer, r in enumerate(chosen)],
    )


def layer_summary(fit: FittedLayers, config, prefix: str = "") -> dict[str, Any]:
    keys = ("recall", "precision", "f1", "predicted_active", "true_active", "missed_mass")
    out: dict[str, Any] = {f"{prefix}{k}": [getattr(m, k) for m in fit.metrics] for k in keys}
    out[f"{prefix}budget_recall"] = fit.budget_recall
    out[f"{prefix}recall_mean"] = float(np.mean(out[f"{prefix}recall"]))
    out[f"{prefix}precision_mean"] = float(np.mean(out[f"{prefix}precision"]))
    out[f"{prefix}budget_recall_mean"] = float(np.mean(fit.budget_recall))
    out[f"{prefix}predicted_active_mean"] = float(np.mean(out[f"{prefix}predicted_active"]))
    out[f"{prefix}true_active_mean"] = float(np.mean(out[f"{prefix}true_active"]))
    out[f"{prefix}predicted_over_true"] = float(
        np.sum(out[f"{prefix}predicted_active"]) / np.sum(out[f"{prefix}true_active"]))
    out[f"{prefix}missed_mass_mean"] = float(np.mean(out[f"{prefix}missed_mass"]))
    out[f"{prefix}predictor_params"] = sum(fit.predictors.param_counts())
    return out


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
        calibration_shards, measure_shards = calibration_split(val_shards)
        shards = (train_shards, calibration_shards, measure_shards)
        counts, profiled_tokens = firing_counts(train_shards, config.n_layers, config.d_ff)
        layer_sparsity, layer_coverage = stats.sparsity(counts, profiled_tokens), stats.coverage_per_layer(counts)
        candidates: dict[int, FittedLayers] = {}
        uniform: FittedLayers | None = None
        profile_fit: FittedLayers | None = None
        met: tuple[bool, ...] = ()
        if cfg.sizing.candidate_ranks:
            for rank in cfg.sizing.candidate_ranks:
                candidates[rank] = fit_layers(cfg, config, (rank,) * config.n_layers, *shards, label=f"rank {rank}")
            if cfg.sizing.budget_rank is not None:
                uniform_rank = cfg.sizing.budget_rank
                budget = uniform_rank * config.n_layers
                ranks = allocate_ranks({r: f.budget_recall for r, f in candidates.items()}, budget)
                profile_ranks, _ = profile_guided_ranks(layer_sparsity, layer_coverage, cfg.sizing.candidate_ranks,
                                                        budget)
                profile_fit = combine_layers(config, cfg.predictor.hidden_activation, profile_ranks, candidates)
                met = tuple(candidates[r].metrics[i].predicted_over_true <= cfg.sizing.max_over_true
                            for i, r in enumerate(ranks))
            else:
                ranks, met = choose_ranks({r: f.metrics for r, f in candidates.items()}, cfg.sizing.max_over_true)
                uniform_rank = uniform_rank_of_equal_size(ranks)
            main = combine_layers(config, cfg.predictor.hidden_activation, ranks, candidates)
            uniform = candidates.get(uniform_rank) or fit_layers(
                cfg, config, (uniform_rank,) * config.n_layers, *shards, label=f"uniform {uniform_rank}")
        else:
            main = fit_layers(cfg, config, ranks, *shards, label="")
        for layer, m in enumerate(main.metrics):
            tracker.log({"recall": m.recall, "precision": m.precision, "predicted_active": m.predicted_active,
                         "true_active": m.true_active, "missed_mass": m.missed_mass, "rank": ranks[layer]},
                        step=layer)
        save_predictors(run_dir / "predictors", main.predictors, config)

        val_data = cfg.data.with_split(Split.validation)
        tokens = split_tokens(val_data, tokenizer, progress=cfg.progress)[: cfg.perplexity_tokens]

        def gated_perplexity(predictors: PredictorSet | None) -> float:
            attach(model, predictors)
            try:
                return perplexity(model, tokens, context=cfg.dataset.seq_len, progress=cfg.progress).perplexity
            finally:
                attach(model, None)

        dense = gated_perplexity(None)
        gated = gated_perplexity(main.predictors)
        curve = [[cfg.predictor.target_recall, float(np.mean([m.recall for m in main.metrics])),
                  float(np.mean([m.predicted_active for m in main.metrics])), gated]]
        decided = np.asarray(main.predictors.thresholds[...]).copy()
        for target in cfg.curve_recalls:
            if target == cfg.predictor.target_recall:
                continue
            layers = main.predictors.layers
            moved = [calibrate(layers[i], calibration_shards, i, config.d_ff, target) for i in range(config.n_layers)]
            measured = [measure(layers[i], moved[i], measure_shards, i, config.d_ff, with_abs=False)
                        for i in range(config.n_layers)]
            main.predictors.thresholds[...] = np.asarray(moved, np.float32)
            curve.append([target, float(np.mean([m.recall for m in measured])),
                          float(np.mean([m.predicted_active for m in measured])), gated_perplexity(main.predictors)])
        main.predictors.thresholds[...] = decided
        curve.sort()
        overhead = main.predictors.overhead(config)
        summary: dict[str, Any] = {
            "model": config.name,
            "activation": config.activation.value,
            "firing_rule": cfg.firing.rule.value,
            "firing_thresholds": thresholds.tolist(),
            "ranks": list(ranks),
            **layer_summary(main, config),
            "threshold": np.asarray(main.predictors.thresholds[...]).tolist(),
            "final_loss": main.final_loss,
            "overhead": overhead,
            "overhead_max": float(np.max(overhead)),
            "perplexity_dense": dense,
            "perplexity_predicted": gated,
            "perplexity_change": gated / dense - 1,
            "recall_curve": curve,  # [target recall, measured recall, predicted active, perplexity]
            "predictor_param_share": sum(main.predictors.param_counts()) / count_params(model),
            "layer_params": list(main.predictors.param_counts()),
            "train_pairs": sum(np.load(s / "x_0.npy", mmap_mode="r").shape[0] for s in train_shards),
            "target_recall": cfg.predictor.target_recall,
            "layer_sparsity": layer_sparsity.tolist(),  # profile of the training pairs
            "layer_coverage80": layer_coverage.tolist(),  # share of neurons holding 80% of a layer's firings
        }
        if candidates:
            summary["sizing_met_bound"] = list(met)
            summary["uniform_rank"] = int(uniform.predictors.ranks[0])
            summary.update(layer_summary(uniform, config, prefix="uniform_"))
            summary["uniform_perplexity_predicted"] = gated_perplexity(uniform.predictors)
            if profile_fit is not None:
                summary["profile_ranks"] = list(profile_fit.predictors.ranks)
                summary.update(layer_summary(profile_fit, config, prefix="profile_"))
                summary["profile_perplexity_predicted"] = gated_perplexity(profile_fit.predictors)
            summary["candidates"] = {
                str(rank): {"recall": [m.recall for m in fit.metrics],
                            "predicted_over_true": [m.predicted_over_true for m in fit.metrics],
                            "budget_recall": fit.budget_recall}
                for rank, fit in candidates.items()
            }
        summary["command"] = current_command()
        tracker.log_summary({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
        atomic_write_json(run_dir / "summary.json", to_jsonable(summary))
    if cfg.record_as:
        write_predictor_result(cfg, summary)
    return summary


def write_predictor_result(cfg: PredictorRunConfig, summary: dict[str, Any]) -> Path:
    keys = ("recall", "precision", "predicted_active", "true_active", "budget_recall", "missed_mass", "overhead")
    rows = [[layer, summary["ranks"][layer], *(summary[k][layer] for k in keys)]
            for layer in range(len(summary["recall"]))]
    metrics = {k: summary[k] for k in (
        "model", "activation", "firing_rule", "target_recall", "recall_mean", "precision_mean",
        "predicted_active_mean", "true_active_mean", "predicted_over_true", "budget_recall_mean", "missed_mass_mean",
        "overhead_max", "perplexity_dense", "perplexity_predicted", "perplexity_change", "predictor_params",
        "predictor_param_share", "train_pairs")}
    metrics["budget_ratio"] = cfg.sizing.max_over_true  # predicted / firing cells at which budget_recall is taken
    tables = [{"title": "Per layer", "columns": ["layer", "rank", *keys], "rows": rows}]
    tables.append({
        "title": f"Perplexity against predicted sparsity (dense {summary['perplexity_dense']:.3f})",
        "columns": ["target_recall", "recall_mean", "predicted_active_mean", "perplexity_predicted"],
        "rows": summary["recall_curve"],
    })
    series = {}
    if "candidates" in summary:
        compare = ("predictor_params", "recall_mean", "precision_mean", "predicted_over_true", "budget_recall_mean",
                   "missed_mass_mean")
        tables.append({
            "title": f"Adaptive ranks vs one uniform rank ({summary['uniform_rank']}) of equal total size",
            "columns": ["sizing", *compare, "perplexity_predicted"],
            "rows": [["adaptive", *(summary[k] for k in compare), summary["perplexity_predicted"]],
                     ["uniform", *(summary[f"uniform_{k}"] for k in compare), summary["uniform_perplexity_predicted"]]]
            + ([["profile-guided", *(summary[f"profile_{k}"] for k in compare),
                 summary["profile_perplexity_predicted"]]] if "profile_ranks" in summary else []),
        })
        series["candidates"] = {
            "columns": ["rank", "layer", "recall", "predicted_over_true", "budget_recall"],
            "rows": [[int(rank), layer, c["recall"][layer], c["predicted_over_true"][layer], c["budget_recall"][layer]]
                     for rank, c in summary["candidates"].items() for layer in range(len(c["recall"]))],
        }
        metrics["uniform_rank"] = summary["uniform_rank"]
        metrics["uniform_perplexity_predicted"] = summary["uniform_perplexity_predicted"]
        metrics["uniform_budget_recall_mean"] = summary["uniform_budget_recall_mean"]
        if "profile_ranks" in summary:
            metrics["profile_perplexity_predicted"] = summary["profile_perplexity_predicted"]
            metrics["profile_budget_recall_mean"] = summary["profile_budget_recall_mean"]
    series["layers"] = {
        "columns": ["layer", "rank", "sparsity", "coverage80", "true_active", "predicted_over_true", "params"]
        + (["profile_rank"] if "profile_ranks" in summary else []),
        "rows": [[layer, summary["ranks"][layer], summary["layer_sparsity"][layer], summary["layer_coverage80"][layer],
                  summary["true_active"][layer], summary["predicted_active"][layer] / summary["true_active"][layer],
                  summary["layer_params"][layer]]
                 + ([summary["profile_ranks"][layer]] if "profile_ranks" in summary else [])
                 for layer in range(len(summary["recall"]))],
    }
    notes = (
        f"Thresholds calibrated per layer to recall {cfg.predictor.target_recall} on half of the validation "
        "pairs, measured on the other half. `predicted_active` / `true_active`: share of neurons predicted / "
        "firing per token. `budget_recall`: recall when each layer predicts "
        f"{cfg.sizing.max_over_true}x its firing cells. `missed_mass`: sum of |a| over firing neurons the "
        "predictor missed / sum of |a|. `overhead`: predictor FLOPs (= f32 bytes) / the dense FFN's. Perplexity: "
        "every FFN keeps only the neurons its predictor selects."
    )
    return write_result(
        cfg.record_as, metrics, command=summary["command"],
        title=predictor_result_title(cfg, summary),
        notes=notes, tables=tables, series=series, results_dir=cfg.results_dir,
    )


def predictor_result_title(cfg: PredictorRunConfig, summary: dict[str, Any]) -> str:
    """What distinguishes this run in the results document: model, rule, sizing, epochs and pairs."""
    ranks = sorted(set(summary["ranks"]))
    sizing = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    if cfg.sizing.candidate_ranks and cfg.sizing.budget_rank is not None:
        sizing += f" within the size of uniform rank {cfg.sizing.budget_rank}"
    elif cfg.sizing.candidate_ranks:
        sizing += f" by the {cfg.sizing.max_over_true:g}x bound"
    return (f"Activation predictors: {summary['model']} ({summary['activation']}, {summary['firing_rule']} rule; "
            f"{sizing}, {cfg.predictor.epochs} epochs, {summary['train_pairs']:,} pairs)")
