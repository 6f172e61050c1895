"""Low-rank activation predictors: per layer, logits over the FFN's neurons from the FFN input.

PowerInfer's predictor is d -> r -> d_ff with a ReLU in between; Deja Vu's has no nonlinearity. Both are
one module here, `hidden_activation` choosing. A `PredictorSet` holds one predictor per layer, each with its
own rank (adaptive sizing), and knows its cost relative to the FFNs it gates.
Legend: D d_model, R rank, F d_ff, N layers.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from sparse_lm.models.config import ModelConfig


class HiddenActivation(str, enum.Enum):
    relu = "relu"  # PowerInfer
    none = "none"  # Deja Vu: a plain low-rank product

    def __str__(self) -> str:
        return self.value


class LowRankPredictor(nnx.Module):
    """logits = act(x W1 + b1) W2 + b2, with W1 [D, R] and W2 [R, F]."""

    def __init__(self, d_model: int, rank: int, d_ff: int, hidden_activation: HiddenActivation, *, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"predictor rank must be >= 1, got {rank}")
        self.hidden_activation = HiddenActivation(hidden_activation)
        self.w1 = nnx.Param(nnx.initializers.normal(d_model**-0.5)(rngs.params(), (d_model, rank)))
        self.b1 = nnx.Param(jnp.zeros((rank,)))
        self.w2 = nnx.Param(nnx.initializers.normal(rank**-0.5)(rngs.params(), (rank, d_ff)))
        self.b2 = nnx.Param(jnp.zeros((d_ff,)))

    @property
    def rank(self) -> int:
        return self.w1.shape[1]

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... F"]:
        h = x @ self.w1[...] + self.b1[...]
        if self.hidden_activation is HiddenActivation.relu:
            h = jax.nn.relu(h)
        return h @ self.w2[...] + self.b2[...]


def predictor_params(d_model: int, rank: int, d_ff: int) -> int:
    return d_model * rank + rank + rank * d_ff + d_ff


def ffn_params(config: ModelConfig) -> int:
    return (3 if config.activation.gated else 2) * config.d_model * config.d_ff


class PredictorSet(nnx.Module):
    """One predictor per layer, with per-layer ranks and calibrated decision thresholds on the logits."""

    def __init__(
        self,
        config: ModelConfig,
        ranks: Sequence[int],
        hidden_activation: HiddenActivation = HiddenActivation.relu,
        *,
        rngs: nnx.Rngs,
    ):
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != config.n_layers:
            raise ValueError(f"{len(ranks)} predictor ranks for a model of {config.n_layers} layers")
        self.d_model, self.d_ff = config.d_model, config.d_ff
        self.layers = nnx.List(
            [LowRankPredictor(config.d_model, r, config.d_ff, hidden_activation, rngs=rngs) for r in ranks]
        )
        self.thresholds = nnx.Variable(jnp.zeros((config.n_layers,)))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(p.rank for p in self.layers)

    def check_fits(self, config: ModelConfig) -> None:
        """Raises unless this set was built for a model of `config`'s layer count and widths."""
        if len(self.layers) != config.n_layers:
            raise ValueError(
                f"predictors cover {len(self.layers)} layers but model {config.name} has {config.n_layers}"
            )
        if (self.d_model, self.d_ff) != (config.d_model, config.d_ff):
            raise ValueError(
                f"predictors map d_model={self.d_model} -> d_ff={self.d_ff} but model {config.name} has "
                f"d_model={config.d_model}, d_ff={config.d_ff}"
            )

    def param_counts(self) -> list[int]:
        return [predictor_params(self.d_model, r, self.d_ff) for r in self.ranks]

    def nbytes(self) -> int:
        """Bytes read per token (float32 weights)."""
        return 4 * sum(self.param_counts())

    def overhead(self, config: ModelConfig) -> list[float]:
        """Per layer: predictor FLOPs (and f32 bytes: the same ratio) as a share of the dense FFN it gates.

        Both are proportional to the parameter counts for a matrix-vector product per token.
        """
        return [p / ffn_params(config) for p in self.param_counts()]
