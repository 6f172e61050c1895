"""Firing rules: when does an FFN neuron count as active for a token.

ReLU-family FFNs (reglu, drelu, relu, relu2) produce exact zeros, so `nonzero` (a != 0) is exact there and
is what a sparse kernel may skip; `positive` (a > 0) equals it for drelu, relu and relu2, whose a is never
negative, but undercounts ReGLU, whose a = relu(gate) * up takes the sign of up. SwiGLU never produces
zeros: silu(gate) * up is negative about as often as positive, so for it `positive` only reports a sign,
and a useful notion of firing needs a magnitude:
`magnitude` (|a| > t_layer, thresholds given or calibrated to a target sparsity, as TEAL and CATS do),
`topk` (the k largest |a| of each token), or `gate_positive` (gate pre-activation > 0, the part of
silu(gate) that is not squashed towards zero). Legend: B batch, L length, F d_ff.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from sparse_lm.models.ffn import CapturePoint
from sparse_lm.utils.config import coerce_enums


class FiringRule(str, enum.Enum):
    positive = "positive"  # a > 0
    nonzero = "nonzero"  # a != 0 (exact firing of every ReLU-family FFN)
    magnitude = "magnitude"  # |a| > t (t per layer)
    topk = "topk"  # the k neurons of largest |a| in each token
    gate_positive = "gate_positive"  # gate pre-activation > 0 (gated FFNs)

    @property
    def capture_points(self) -> frozenset[CapturePoint]:
        needed = {CapturePoint.ffn_hidden}
        if self is FiringRule.gate_positive:
            needed.add(CapturePoint.ffn_gate)
        return frozenset(needed)


@dataclasses.dataclass(frozen=True)
class FiringConfig:
    """Schema of `conf/firing/*.yaml`.

    Attributes:
      rule: the firing rule.
      thresholds: `magnitude` only: |a| thresholds, one value or one per layer; None calibrates them so that
        `target_sparsity` of the calibration activations fall at or below the threshold, per layer.
      target_sparsity: `magnitude` calibration target, and for `topk` the fraction of neurons NOT kept
        (k = round((1 - target_sparsity) * d_ff)). In [0, 1).
      calibration_tokens: tokens of the calibration split used to calibrate thresholds.
    """

    rule: FiringRule = FiringRule.magnitude
    thresholds: tuple[float, ...] | None = None
    target_sparsity: float = 0.5
    calibration_tokens: int = 16384

    def __post_init__(self):
        coerce_enums(self, "firing", {"rule": FiringRule})
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"firing.target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
            if not self.thresholds or any(t < 0 for t in self.thresholds):
                raise ValueError(f"firing.thresholds must be non-negative values, got {self.thresholds}")
            if self.rule is not FiringRule.magnitude:
                raise ValueError(f"firing.thresholds only apply to rule=magnitude, not {self.rule.value}")
        if self.calibration_tokens < 1:
            raise ValueError(f"firing.calibration_tokens must be >= 1, got {self.calibration_tokens}")

    def topk(self, d_ff: int) -> int:
        return max(1, round((1 - self.target_sparsity) * d_ff))

    def needs_calibration(self) -> bool:
        return self.rule is FiringRule.magnitude and self.thresholds is None


def fire_mask(
    rule: FiringRule,
    hidden: Float[Array, "B L F"],
    *,
    gate: Float[Array, "B L F"] | None = None,
    threshold: Float[Array, ""] | float | None = None,
    k: int | None = None,
) -> Bool[Array, "B L F"]:
    """Which neurons fire for each token under `rule`."""
    if rule is FiringRule.positive:
        return hidden > 0
    if rule is FiringRule.nonzero:
        return hidden != 0
    if rule is FiringRule.magnitude:
        if threshold is None:
            raise ValueError("rule magnitude needs a threshold")
        return jnp.abs(hidden) > threshold
    if rule is FiringRule.topk:
        if k is None or not 1 <= k <= hidden.shape[-1]:
            raise ValueError(f"rule topk needs 1 <= k <= {hidden.shape[-1]}, got {k}")
        magnitude = jnp.abs(hidden)
        kth_largest = jax.lax.top_k(magnitude, k)[0][..., -1:]
        return magnitude >= kth_largest  # ties at the k-th value all fire
    if rule is FiringRule.gate_positive:
        if gate is None:
            raise ValueError("rule gate_positive needs the gate pre-activation (a gated FFN)")
        return gate > 0
    raise ValueError(f"unknown firing rule {rule!r}")
