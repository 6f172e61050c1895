"""What limits a predictor: its quality against training pairs, epochs and rank, on a few layers, beside a
training-free reference with the same structure.

For each chosen layer, pairs are read into memory once; for every (pairs, rank) one predictor is trained for the
largest epoch count and measured after each listed epoch: the predicted/true ratio at the recall target
(threshold calibrated on half of the validation pairs, measured on the other half), the recall at a fixed
prediction budget, and the same ratio on training pairs (a gap between the two is overfitting, none is
underfitting).

The reference ("projection") needs no training. When firing is decided by signs of the FFN's own
pre-activations (ReLU-family FFNs under the `nonzero` or `positive` rule), the optimal rank-r linear predictor of
a pre-activation z = x W on the data, in squared error, is x W V_r V_r^T with V_r the top right singular vectors
of Z (Eckart-Young on the training pairs): a d -> r -> d_ff predictor with known weights. dReLU fires where
gate > 0 and up > 0, so it needs both (2r ranks of predictor); its score is the smaller of the two standardised
projections. At r = d_model the projection is exact (ratio 1), so the curve shows how much rank the layer's
firing pattern needs.
Legend: T tokens, D d_model, F d_ff, R rank.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from sparse_lm.data import DataConfig, Split
from sparse_lm.models.config import Activation
from sparse_lm.models.loading import ModelSpec, build_model
from sparse_lm.predictors.dataset import calibration_split, layer_batches, open_dataset
from sparse_lm.predictors.metrics import budget_threshold, calibrate_threshold
from sparse_lm.predictors.module import LowRankPredictor, predictor_params
from sparse_lm.predictors.run import PredictorDataConfig, PredictorRunConfig, build_dataset
from sparse_lm.predictors.train import PredictorTrainConfig, positive_weight, predict_logits, train_step
from sparse_lm.profiling.firing import FiringConfig, FiringRule
from sparse_lm.profiling.run import ProfileConfig, firing_thresholds
from sparse_lm.results import current_command, write_result
from sparse_lm.tracking import TrackerConfig, make_tracker
from sparse_lm.tracking.base import to_jsonable
from sparse_lm.utils.io import atomic_write_json


def _positive_ints(name: str, values) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if not out or any(v < 1 for v in out):
        raise ValueError(f"scaling.{name} must be a non-empty list of positive integers, got {list(values)}")
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """Attributes:
    layers: layers studied (each costs one pass over its pairs per (pairs, rank) and epoch).
    train_tokens: training-pair counts (prefixes of the dataset's training pairs, whole shards); the largest must
      not exceed `dataset.train_tokens`.
    ranks: predictor ranks trained.
    epochs: measured after these epochs; the largest is trained.
    projection_ranks: ranks of the training-free projection reference (empty: skip it).
    projection_tokens: training pairs whose pre-activations define the projection.
    train_check_tokens: training pairs on which the train-side ratio is measured.
    """

    layers: tuple[int, ...] = (2, 14, 27)
    train_tokens: tuple[int, ...] = (16384, 65536, 262144)
    ranks: tuple[int, ...] = (32, 96, 192, 384)
    epochs: tuple[int, ...] = (1, 2, 4, 8)
    projection_ranks: tuple[int, ...] = (16, 32, 64, 96, 128, 192, 256, 384, 576)
    projection_tokens: int = 65536
    train_check_tokens: int = 16384
    budget_ratio: float = 1.25

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(sorted({int(v) for v in self.layers})))
        if not self.layers or min(self.layers) < 0:
            raise ValueError(f"scaling.layers must be a non-empty list of layer indices, got {list(self.layers)}")
        for name in ("train_tokens", "ranks", "epochs"):
            object.__setattr__(self, name, _positive_ints(name, getattr(self, name)))
        projection = tuple(int(v) for v in self.projection_ranks)
        if any(v < 1 for v in projection):
            raise ValueError(f"scaling.projection_ranks must be positive, got {list(projection)}")
        object.__setattr__(self, "projection_ranks", tuple(sorted(set(projection))))
        for name in ("projection_tokens", "train_check_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"scaling.{name} must be >= 1, got {getattr(self, name)}")
        if self.budget_ratio < 1:
            raise ValueError(f"scaling.budget_ratio must be >= 1, got {self.budget_ratio}")


@dataclasses.dataclass(frozen=True)
class ScalingRunConfig:
    """Schema of `conf/predictor_scaling.yaml` (model, data, rule and pairs as in train_predictor)."""

    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(split=Split.train))
    firing: FiringConfig = dataclasses.field(default_factory=FiringConfig)
    dataset: PredictorDataConfig = dataclasses.field(default_factory=PredictorDataConfig)
    predictor: PredictorTrainConfig = dataclasses.field(default_factory=PredictorTrainConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    tracker: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    progress: bool = True
    record_as: str | None = None
    results_dir: str = "results"

    def __post_init__(self):
        if max(self.scaling.train_tokens) > self.dataset.train_tokens:
            raise ValueError(
                f"scaling.train_tokens {list(self.scaling.train_tokens)} exceeds dataset.train_tokens="
                f"{self.dataset.train_tokens}; raise dataset.train_tokens"
            )


@dataclasses.dataclass
class Pairs:
    x: np.ndarray  # float32 [T, D]
    fired: np.ndarray  # bool [T, F]


def load_pairs(shards: list[Path], layer: int, d_ff: int, tokens: int | None = None) -> Pairs:
    """One layer's pairs of `shards` in memory (the first `tokens`, whole shards read as needed)."""
    xs, fired, have = [], [], 0
    for batch in layer_batches(shards, layer, d_ff, batch_tokens=1 << 30):
        xs.append(batch.x)
        fired.append(batch.fired)
        have += len(batch.x)
        if tokens is not None and have >= tokens:
            break
    x, f = np.concatenate(xs), np.concatenate(fired)
    return Pairs(x[:tokens], f[:tokens]) if tokens is not None else Pairs(x, f)


def ratio_at_recall(calibration: tuple[np.ndarray, np.ndarray], measured: tuple[np.ndarray, np.ndarray],
                    target_recall: float, budget_ratio: float) -> dict[str, float]:
    """Threshold the scores at the target recall (and at `budget_ratio` x the firing cells) on `calibration`,
    measure predicted/true, recall and budget recall on `measured`. Each is (scores [T, F], fired [T, F])."""
    scores, fired = calibration
    threshold = calibrate_threshold(scores, fired, target_recall)
    budget = budget_threshold(scores, fired, budget_ratio)
    scores, fired = measured
    predicted = scores > threshold
    n_fired = max(int(fired.sum()), 1)
    return {
        "recall": float((predicted & fired).sum() / n_fired),
        "predicted_over_true": float(predicted.sum() / n_fired),
        "budget_recall": float(((scores > budget) & fired).sum() / n_fired),
    }


def train_and_measure(
    train: Pairs, calibration: Pairs, measured: Pairs, train_check: Pairs, rank: int, cfg: PredictorTrainConfig,
    scaling: ScalingConfig, seed: int,
) -> list[dict[str, Any]]:
    """Train one predictor on `train` for max(epochs); measurements after each listed epoch."""
    d_model, d_ff = train.x.shape[1], train.fired.shape[1]
    predictor = LowRankPredictor(d_model, rank, d_ff, cfg.hidden_activation, rngs=nnx.Rngs(seed))
    pos_weight = jnp.float32(positive_weight(cfg, float(train.fired.mean())))
    graphdef, params = nnx.split(predictor)
    opt_state = optax.adam(cfg.lr).init(params)
    step = train_step(graphdef, cfg.loss, cfg.focal_gamma, cfg.lr)
    rng = np.random.default_rng(seed)
    n_batches = max(len(train.x) // cfg.batch_tokens, 1)
    rows, steps = [], 0
    for epoch in range(1, max(scaling.epochs) + 1):
        order = rng.permutation(len(train.x))
        losses = []
        for b in range(n_batches):
            rows_b = np.sort(order[b * cfg.batch_tokens : (b + 1) * cfg.batch_tokens])
            params, opt_state, loss = step(params, opt_state, train.x[rows_b], train.fired[rows_b], pos_weight)
            losses.append(loss)
            steps += 1
        if epoch not in scaling.epochs:
            continue
        nnx.update(predictor, params)
        logits = {name: predict_logits(predictor, pairs.x) for name, pairs in
                  (("cal", calibration), ("val", measured), ("train", train_check))}
        val = ratio_at_recall((logits["cal"], calibration.fired), (logits["val"], measured.fired),
                              cfg.target_recall, scaling.budget_ratio)
        on_train = ratio_at_recall((logits["train"], train_check.fired), (logits["train"], train_check.fired),
                                   cfg.target_recall, scaling.budget_ratio)
        rows.append({
            "epoch": epoch, "steps": steps, "loss": float(np.mean([float(v) for v in losses])),
            **{f"val_{k}": v for k, v in val.items()},
            "train_predicted_over_true": on_train["predicted_over_true"],
            "train_budget_recall": on_train["budget_recall"],
        })
    return rows


def projection_supported(activation: Activation, rule: FiringRule) -> bool:
    """Whether firing is the sign pattern of the FFN's pre-activations (so a projection reference exists)."""
    if rule is FiringRule.nonzero:
        return activation in (Activation.drelu, Activation.reglu, Activation.relu, Activation.relu2)
    if rule is FiringRule.positive:
        return activation in (Activation.drelu, Activation.relu, Activation.relu2)
    return False


def _signal_weights(ffn, activation: Activation) -> list[np.ndarray]:
    """The [D, F] matrices whose pre-activations decide firing: gate and up for dReLU, the gate for ReGLU, up
    for the ungated ReLUs."""
    if activation is Activation.drelu:
        return [np.asarray(ffn.w_gate[...], np.float64), np.asarray(ffn.w_up[...], np.float64)]
    if activation is Activation.reglu:
        return [np.asarray(ffn.w_gate[...], np.float64)]
    return [np.asarray(ffn.w_up[...], np.float64)]


def projection_reference(
    weights: list[np.ndarray], fit_x: np.ndarray, calibration: Pairs, measured: Pairs, ranks: tuple[int, ...],
    target_recall: float, budget_ratio: float,
) -> list[dict[str, Any]]:
    """The training-free rank-r predictor of each signal (see the module docstring), at every rank."""
    bases, scales = [], []
    for w in weights:
        z = fit_x.astype(np.float64) @ w  # [T, F]
        eigenvalues, vectors = np.linalg.eigh(z.T @ z)
        bases.append(vectors[:, np.argsort(eigenvalues)[::-1]])  # right singular vectors of Z, largest first
        scales.append(z.std(axis=0) + 1e-12)
    def score(x: np.ndarray, rank: int) -> np.ndarray:
        parts = []
        for w, basis, scale in zip(weights, bases, scales, strict=True):
            v = basis[:, :rank]
            parts.append(((x.astype(np.float64) @ w) @ v) @ v.T / scale)
        return np.minimum.reduce(parts) if len(parts) > 1 else parts[0]

    rows = []
    for rank in ranks:
        if rank > fit_x.shape[1]:
            continue
        measured_ratio = ratio_at_recall((score(calibration.x, rank), calibration.fired),
                                         (score(measured.x, rank), measured.fired), target_recall, budget_ratio)
        rows.append({"rank": rank, "predictor_rank": rank * len(weights), **measured_ratio})
    return rows


def overhead_of_rank(rank: int, d_model: int, d_ff: int, gated: bool) -> float:
    """FLOPs (= parameters) of a d -> rank -> d_ff predictor over those of the dense FFN it gates, as
    `PredictorSet.overhead` counts them."""
    return predictor_params(d_model, rank, d_ff) / ((3 if gated else 2) * d_model * d_ff)


def run(cfg: ScalingRunConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", to_jsonable(cfg))
    tracker = make_tracker(cfg.tracker, run_dir, run_config=to_jsonable(cfg), run_name=run_dir.name)
    sc = cfg.scaling
    with tracker:
        model, tokenizer = build_model(cfg.model)
        config = model.config
        bad = [layer for layer in sc.layers if layer >= config.n_layers]
        if bad:
            raise ValueError(f"scaling.layers {bad} out of range: the model has {config.n_layers} layers")
        data_cfg = PredictorRunConfig(model=cfg.model, data=cfg.data, firing=cfg.firing, dataset=cfg.dataset,
                                      progress=cfg.progress)
        profile = ProfileConfig(seq_len=cfg.dataset.seq_len, batch_size=cfg.dataset.batch_size, progress=cfg.progress)
        thresholds = firing_thresholds(model, tokenizer, cfg.firing, cfg.data, profile)
        root = Path(cfg.dataset.folder) if cfg.dataset.folder else run_dir / "dataset"
        folders = build_dataset(data_cfg, model, tokenizer, thresholds, root)
        _, train_shards = open_dataset(folders["train"])
        _, val_shards = open_dataset(folders["validation"])
        calibration_shards, measure_shards = calibration_split(val_shards)
        with_projection = bool(sc.projection_ranks) and projection_supported(config.activation, cfg.firing.rule)
        trained, projected, layer_stats = [], [], []
        total = len(sc.layers) * len(sc.train_tokens) * len(sc.ranks)
        bar = tqdm(total=total, desc="predictor scaling", unit="fit", disable=not cfg.progress)
        for layer in sc.layers:
            train_all = load_pairs(train_shards, layer, config.d_ff, max(sc.train_tokens))
            calibration = load_pairs(calibration_shards, layer, config.d_ff)
            measured = load_pairs(measure_shards, layer, config.d_ff)
            check = Pairs(train_all.x[: sc.train_check_tokens], train_all.fired[: sc.train_check_tokens])
            layer_stats.append({"layer": layer, "true_active": float(measured.fired.mean()),
                                "train_pairs_available": len(train_all.x)})
            if with_projection:
                weights = _signal_weights(model.blocks[layer].ffn, config.activation)
                for row in projection_reference(weights, train_all.x[: sc.projection_tokens], calibration, measured,
                                                sc.projection_ranks, cfg.predictor.target_recall, sc.budget_ratio):
                    projected.append({"layer": layer, **row})
                    tracker.log({f"projection/layer{layer}/predicted_over_true": row["predicted_over_true"]},
                                step=row["rank"])
            for tokens in sc.train_tokens:
                subset = Pairs(train_all.x[:tokens], train_all.fired[:tokens])
                for rank in sc.ranks:
                    for row in train_and_measure(subset, calibration, measured, check, rank, cfg.predictor, sc,
                                                 seed=cfg.predictor.seed + layer):
                        trained.append({"layer": layer, "train_pairs": len(subset.x), "rank": rank,
                                        "overhead": overhead_of_rank(rank, config.d_model, config.d_ff,
                                                                     config.activation.gated), **row})
                    last = trained[-1]
                    tracker.log({f"layer{layer}/pairs{len(subset.x)}/rank{rank}/predicted_over_true":
                                 last["val_predicted_over_true"]}, step=last["steps"])
                    bar.set_postfix(layer=layer, pairs=len(subset.x), rank=rank,
                                    over=f"{last['val_predicted_over_true']:.2f}")
                    bar.update(1)
                    atomic_write_json(run_dir / "partial.json", {"trained": trained, "projection": projected})
        bar.close()
        summary = {
            "model": config.name, "activation": config.activation.value, "firing_rule": cfg.firing.rule.value,
            "target_recall": cfg.predictor.target_recall, "budget_ratio": sc.budget_ratio,
            "hidden_activation": cfg.predictor.hidden_activation.value, "loss": cfg.predictor.loss.value,
            "d_model": config.d_model, "d_ff": config.d_ff, "layers": layer_stats,
            "trained": trained, "projection": projected, "command": current_command(),
        }
        atomic_write_json(run_dir / "summary.json", to_jsonable(summary))
        (run_dir / "partial.json").unlink(missing_ok=True)
    if cfg.record_as:
        write_scaling_result(cfg, summary)
    return summary


def write_scaling_result(cfg: ScalingRunConfig, summary: dict[str, Any]) -> Path:
    trained, projected = summary["trained"], summary["projection"]
    largest = max(r["train_pairs"] for r in trained)
    last_epoch = max(r["epoch"] for r in trained)
    final = [r for r in trained if r["epoch"] == last_epoch]
    metrics: dict[str, Any] = {"model": summary["model"], "activation": summary["activation"],
                               "firing_rule": summary["firing_rule"], "target_recall": summary["target_recall"]}
    for r in final:
        if r["train_pairs"] == largest:
            metrics[f"layer{r['layer']}_rank{r['rank']}_val_over_true"] = r["val_predicted_over_true"]
    for r in projected:
        metrics[f"layer{r['layer']}_projection{r['rank']}_over_true"] = r["predicted_over_true"]
    trained_columns = ["layer", "train_pairs", "rank", "overhead", "epoch", "steps", "loss", "val_recall",
                       "val_predicted_over_true", "val_budget_recall", "train_predicted_over_true",
                       "train_budget_recall"]
    tables = [{
        "title": f"Trained predictors after {last_epoch} epochs: validation vs training pairs",
        "columns": trained_columns,
        "rows": [[r[c] for c in trained_columns] for r in final],
    }]
    if projected:
        columns = ["layer", "rank", "predictor_rank", "overhead", "recall", "predicted_over_true", "budget_recall"]
        gated = summary["activation"] in ("swiglu", "reglu", "drelu")
        tables.append({
            "title": "Training-free projection reference (optimal rank-r linear predictor of the pre-activations)",
            "columns": columns,
            "rows": [[r["layer"], r["rank"], r["predictor_rank"],
                      overhead_of_rank(r["predictor_rank"], summary["d_model"], summary["d_ff"], gated),
                      r["recall"], r["predicted_over_true"], r["budget_recall"]] for r in projected],
        })
    series = {"trained": {"columns": trained_columns, "rows": [[r[c] for c in trained_columns] for r in trained]}}
    if projected:
        series["projection"] = {"columns": ["layer", "rank", "predictor_rank", "predicted_over_true", "budget_recall"],
                                "rows": [[r["layer"], r["rank"], r["predictor_rank"], r["predicted_over_true"],
                                          r["budget_recall"]] for r in projected]}
    notes = (
        f"Per layer, a {summary['hidden_activation']}-hidden predictor ({summary['loss']} loss) trained on the first "
        "`train_pairs` training pairs; after each listed epoch the threshold is calibrated to recall "
        f"{summary['target_recall']} on half of the validation pairs and `val_predicted_over_true` (predicted / "
        "firing cells) measured on the other half; `train_predicted_over_true` is the same on training pairs "
        f"(calibrated there). `budget_recall`: recall when predicting {summary['budget_ratio']}x the firing cells. "
        "`overhead`: predictor FLOPs / the dense FFN's. The projection reference needs no training: the optimal "
        "rank-r linear predictor of the FFN's own pre-activations (dReLU: gate and up, so twice the rank)."
    )
    return write_result(
        cfg.record_as, metrics, command=summary["command"],
        title=f"Predictor scaling: {summary['model']} ({summary['activation']}, {summary['firing_rule']} rule)",
        notes=notes, tables=tables, series=series, results_dir=cfg.results_dir,
    )
