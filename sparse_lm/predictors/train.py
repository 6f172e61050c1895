"""Training one layer's predictor on its shards (weighted BCE or focal loss), then calibrating its threshold
and measuring it on validation shards.

Legend: T tokens, D d_model, F d_ff.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float

from sparse_lm.predictors.dataset import layer_batches
from sparse_lm.predictors.metrics import LayerMetrics, MetricsAccumulator, budget_threshold, calibrate_threshold
from sparse_lm.predictors.module import HiddenActivation, LowRankPredictor
from sparse_lm.utils.config import coerce_enums


class PredictorLoss(str, enum.Enum):
    bce = "bce"  # binary cross-entropy, positives weighted by pos_weight
    focal = "focal"  # the same, scaled by (1 - p_true)^gamma (Lin et al.)

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class PredictorTrainConfig:
    """Attributes:
    pos_weight: weight of the firing class; None sets it per layer to (1 - rate) / rate from the training
      shards' firing rate, capped at 10 (balances the classes of very sparse layers).
    target_recall: the decision threshold is calibrated on validation data to reach this recall.
    """

    hidden_activation: HiddenActivation = HiddenActivation.relu
    loss: PredictorLoss = PredictorLoss.bce
    pos_weight: float | None = None
    focal_gamma: float = 2.0
    lr: float = 3e-3
    epochs: int = 2
    batch_tokens: int = 1024
    seed: int = 0
    target_recall: float = 0.95

    def __post_init__(self):
        coerce_enums(self, "predictor", {"hidden_activation": HiddenActivation, "loss": PredictorLoss})
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"predictor.target_recall must be in (0, 1], got {self.target_recall}")
        if self.pos_weight is not None and self.pos_weight <= 0:
            raise ValueError(f"predictor.pos_weight must be positive or null, got {self.pos_weight}")
        for field in ("lr", "epochs", "batch_tokens"):
            if getattr(self, field) <= 0:
                raise ValueError(f"predictor.{field} must be positive, got {getattr(self, field)}")
        if self.focal_gamma < 0:
            raise ValueError(f"predictor.focal_gamma must be >= 0, got {self.focal_gamma}")


def predictor_loss(
    logits: Float[Array, "T F"], fired: Bool[Array, "T F"], pos_weight: Float[Array, ""], loss: PredictorLoss,
    gamma: float,
) -> Float[Array, ""]:
    y = fired.astype(jnp.float32)
    per_cell = pos_weight * y * jax.nn.softplus(-logits) + (1 - y) * jax.nn.softplus(logits)
    if loss is PredictorLoss.focal:
        p_true = jnp.where(fired, jax.nn.sigmoid(logits), jax.nn.sigmoid(-logits))
        per_cell = per_cell * (1 - p_true) ** gamma
    return jnp.mean(per_cell)


@functools.cache
def train_step(graphdef, loss: PredictorLoss, gamma: float, lr: float):
    """One jitted step per (shape, loss, lr): layers of the same rank share its compilation."""
    tx = optax.adam(lr)
    @jax.jit
    def step(params, opt_state, x, fired, pos_weight):
        def objective(params):
            return predictor_loss(nnx.merge(graphdef, params)(x), fired, pos_weight, loss, gamma)

        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


@functools.cache
def _logits_fn(graphdef):
    return jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))


def firing_rate(shards: list[Path], layer: int, d_ff: int) -> float:
    fired = total = 0
    for shard in shards:
        bits = np.load(shard / f"fired_{layer}.npy", mmap_mode="r")
        fired += int(np.unpackbits(np.asarray(bits), axis=1, count=d_ff).sum())
        total += bits.shape[0] * d_ff
    return fired / total


def positive_weight(cfg: PredictorTrainConfig, rate: float) -> float:
    """The configured weight of the firing class, or (1 - rate) / rate capped at 10."""
    if cfg.pos_weight is not None:
        return cfg.pos_weight
    return min((1 - rate) / rate, 10.0) if rate > 0 else 1.0


def train_layer(
    shards: list[Path], layer: int, d_model: int, d_ff: int, rank: int, cfg: PredictorTrainConfig
) -> tuple[LowRankPredictor, list[float]]:
    """A predictor for `layer` trained on `shards`; returns it and the mean loss of each epoch."""
    predictor = LowRankPredictor(d_model, rank, d_ff, cfg.hidden_activation, rngs=nnx.Rngs(cfg.seed + layer))
    pos_weight = positive_weight(cfg, firing_rate(shards, layer, d_ff))
    tx = optax.adam(cfg.lr)
    graphdef, params = nnx.split(predictor)
    opt_state = tx.init(params)
    step = train_step(graphdef, cfg.loss, cfg.focal_gamma, cfg.lr)
    epoch_losses = []
    for epoch in range(cfg.epochs):
        losses = []
        for batch in layer_batches(shards, layer, d_ff, cfg.batch_tokens, shuffle_seed=cfg.seed * 1000 + epoch):
            params, opt_state, value = step(params, opt_state, batch.x, batch.fired, jnp.float32(pos_weight))
            losses.append(float(value))
        epoch_losses.append(float(np.mean(losses)))
    nnx.update(predictor, params)
    return predictor, epoch_losses


def predict_logits(predictor: LowRankPredictor, x: np.ndarray) -> np.ndarray:
    graphdef, params = nnx.split(predictor)
    return np.asarray(_logits_fn(graphdef)(params, x))


def calibrate(
    predictor: LowRankPredictor, shards: list[Path], layer: int, d_ff: int, target_recall: float,
    budget_ratio: float | None = None, batch_tokens: int = 4096,
) -> float | tuple[float, float]:
    """The largest logit threshold reaching `target_recall` on the tokens of `shards`; with `budget_ratio`,
    also the threshold predicting that many times the firing cells (see `budget_threshold`)."""
    logits, fired = [], []
    for batch in layer_batches(shards, layer, d_ff, batch_tokens):
        logits.append(predict_logits(predictor, batch.x))
        fired.append(batch.fired)
    all_logits, all_fired = np.concatenate(logits), np.concatenate(fired)
    threshold = calibrate_threshold(all_logits, all_fired, target_recall)
    if budget_ratio is None:
        return threshold
    return threshold, budget_threshold(all_logits, all_fired, budget_ratio)


def measure(
    predictor: LowRankPredictor, threshold: float, shards: list[Path], layer: int, d_ff: int, with_abs: bool,
    batch_tokens: int = 4096,
) -> LayerMetrics:
    """Recall, precision, active fractions and missed mass of `logits > threshold` on `shards`."""
    metrics = MetricsAccumulator()
    for batch in layer_batches(shards, layer, d_ff, batch_tokens, with_abs=with_abs):
        metrics.add(predict_logits(predictor, batch.x) > threshold, batch.fired, batch.abs_hidden)
    return metrics.result()
