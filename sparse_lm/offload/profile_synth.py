"""Synthetic firing profiles for model shapes we have no measured profile of: per-neuron firing probabilities
drawn from a power law, with a chosen mean per layer. Legend: L layers, F neurons per layer (d_ff).

A profile fit (sparse_lm.profiling.powerlaw_fit) describes the distribution of per-neuron firing frequencies by
the exponent alpha of its density, p(f) ~ f^-alpha. Here the frequencies of one layer are the F evenly spaced
quantiles of that Pareto law (deterministic, so a profile does not depend on sampling noise), scaled so their
mean is the layer's active fraction and clipped at 1 (a neuron cannot fire on more than every token), then
shuffled over neuron indices with a seeded permutation (hot neurons are not index-ordered in real models).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

# Exponent bracket for calibrating to a hot share: below ~1.05 the quantiles overflow float64 at F ~ 1e5,
# above 50 the law is nearly flat.
_ALPHA_LOW, _ALPHA_HIGH = 1.05, 50.0


def _check_alpha(exponent: float) -> float:
    if not isinstance(exponent, int | float) or isinstance(exponent, bool) or not exponent > 1:
        raise ValueError(f"exponent must be a number > 1 (the density exponent alpha), got {exponent!r}")
    return float(exponent)


def pareto_quantiles(n: int, exponent: float) -> Float[np.ndarray, " N"]:
    """The n evenly spaced quantiles (midpoints) of a Pareto law with density exponent `exponent` and x_min 1,
    in descending order (the hottest first)."""
    if n < 1:
        raise ValueError(f"need at least one neuron, got {n}")
    alpha = _check_alpha(exponent)
    tail = (np.arange(n, dtype=np.float64) + 0.5) / n  # survival probability of each quantile, ascending
    return tail ** (-1.0 / (alpha - 1.0))


def scale_to_mean(values: Float[np.ndarray, " N"], mean: float) -> Float[np.ndarray, " N"]:
    """min(s * values, 1) with the scale s chosen so the result has the given mean (values > 0).

    With the k largest values clipped, s = (n mean - k) / (sum of the others); the answer is the least k at
    which the largest unclipped value stays <= 1 once scaled (water filling, exact).
    """
    values = np.asarray(values, np.float64)
    if not 0 < mean <= 1:
        raise ValueError(f"active fraction must be in (0, 1], got {mean}")
    if mean == 1:
        return np.ones_like(values)
    ordered = np.sort(values)[::-1]
    n = ordered.size
    rest = np.cumsum(ordered[::-1])[::-1]  # rest[k]: sum of ordered[k:]
    clipped = np.arange(n)
    scale = (n * mean - clipped) / rest
    k = int(np.argmax(scale * ordered <= 1.0))  # exists: at k = n - 1, scale * ordered[-1] = n mean - n + 1 <= 1
    return np.minimum(values * scale[k], 1.0)


def top_share(frequencies: Float[np.ndarray, " N"], fraction: float) -> float:
    """Share of all firings made by the top `fraction` of neurons (at least one neuron)."""
    ordered = np.sort(np.asarray(frequencies, np.float64))[::-1]
    k = max(1, int(round(fraction * ordered.size)))
    return float(ordered[:k].sum() / ordered.sum())


def layer_profile(d_ff: int, active_fraction: float, exponent: float) -> Float[np.ndarray, " F"]:
    """One layer's firing probabilities, hottest first: Pareto quantiles scaled to `active_fraction`."""
    return scale_to_mean(pareto_quantiles(d_ff, exponent), active_fraction)


def exponent_for_hot_share(d_ff: int, active_fraction: float, hot_fraction: float, share: float) -> float:
    """The exponent at which the top `hot_fraction` of a layer's neurons make `share` of its firings.

    A smaller exponent is a heavier tail, so the share falls as the exponent grows; the root is found by
    bisection between 1.05 and 50. Example: PowerInfer reports 26% of OPT-30B's neurons making 80% of its
    activations.
    """
    if not 0 < hot_fraction < 1:
        raise ValueError(f"hot_share fraction of neurons must be in (0, 1), got {hot_fraction}")
    if not hot_fraction < share < 1:
        raise ValueError(f"hot_share share of firings must be in ({hot_fraction}, 1), got {share}")

    def share_at(alpha: float) -> float:
        return top_share(layer_profile(d_ff, active_fraction, alpha), hot_fraction)

    low, high = _ALPHA_LOW, _ALPHA_HIGH
    if not share_at(high) <= share <= share_at(low):
        raise ValueError(
            f"hot_share ({hot_fraction}, {share}) is not reachable at active fraction {active_fraction} "
            f"(the top {hot_fraction:.0%} make {share_at(high):.3f} to {share_at(low):.3f} of firings for "
            f"exponents {_ALPHA_HIGH} to {_ALPHA_LOW})"
        )
    for _ in range(40):
        middle = 0.5 * (low + high)
        if share_at(middle) > share:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def synthetic_frequencies(
    layers: int,
    d_ff: int,
    *,
    active_fraction: float | Sequence[float],
    exponent: float | None = None,
    hot_share: tuple[float, float | Sequence[float]] | None = None,
    seed: int = 0,
) -> Float[np.ndarray, "L F"]:
    """Per-neuron firing probabilities of a synthetic power-law profile.

    Args:
      layers, d_ff: the shape, L x F.
      active_fraction: mean firing probability per layer (one value for all, or L values): 1 - sparsity.
      exponent: density exponent alpha of the per-neuron frequencies (> 1; smaller is more skewed).
      hot_share: instead of `exponent`, (fraction of neurons, share of firings) to calibrate it to, e.g.
        (0.26, 0.80); the share may be one value or L values; calibrated on each layer's own active fraction.
      seed: seeds the shuffle of neuron indices within each layer.

    Returns:
      float64 [L, F] in (0, 1], each row's mean equal to its active fraction.
    """
    if layers < 1 or d_ff < 1:
        raise ValueError(f"need layers >= 1 and d_ff >= 1, got {layers} x {d_ff}")
    if (exponent is None) == (hot_share is None):
        raise ValueError("give exactly one of exponent and hot_share")
    fractions = np.asarray(active_fraction, np.float64)
    if fractions.ndim == 0:
        fractions = np.full(layers, float(fractions))
    if fractions.shape != (layers,):
        raise ValueError(f"active_fraction needs one value or {layers} (one per layer), got {fractions.shape[0]}")
    if hot_share is not None:
        hot_fraction, shares = hot_share
        shares = np.asarray(shares, np.float64)
        shares = np.full(layers, float(shares)) if shares.ndim == 0 else shares
        if shares.shape != (layers,):
            raise ValueError(f"hot_share needs one share or {layers} (one per layer), got {shares.shape[0]}")
    rng = np.random.default_rng(seed)
    out = np.empty((layers, d_ff), np.float64)
    profiles: dict[tuple[float, float], np.ndarray] = {}  # layers of equal fraction and share share one law
    for layer, fraction in enumerate(fractions):
        key = (float(fraction), float(shares[layer]) if hot_share is not None else 0.0)
        if key not in profiles:
            alpha = exponent if exponent is not None else exponent_for_hot_share(
                d_ff, key[0], float(hot_fraction), key[1])
            profiles[key] = layer_profile(d_ff, key[0], alpha)
        out[layer] = profiles[key][rng.permutation(d_ff)]
    return out
