"""Pure numpy statistics over per-neuron firing counts: firing rates, coverage, Gini, hot/cold sets, overlap."""

from __future__ import annotations

import math
import numbers

import numpy as np
from jaxtyping import Bool, Float, Int, Real

# Legend: L layers, F neurons per layer (d_ff), N values of a 1-D array (one layer's F, or L*F pooled).
#
# Inputs come from a streaming profiler: `counts[l, i]` = number of profiled tokens for which neuron i of
# layer l fired, and `tokens` = number of tokens profiled (the same for every layer). Functions that rank
# or share out "firings" (coverage, Gini, hot sets, overlap) accept any non-negative values, so they work
# unchanged on `magnitude_sums` (sum of |activation| per neuron) as well as on counts.


# ------------------------------------------------------------------------------------------------ validation


def _as_values(values, name: str, ndim: int) -> np.ndarray:
    """`values` as a float64 array of rank `ndim`, finite and non-negative, else ValueError naming `name`."""
    array = np.asarray(values)
    if array.ndim != ndim:
        expected = "[L, F]" if ndim == 2 else "1-D"
        raise ValueError(f"{name} must be {expected} (rank {ndim}), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must hold integers or floats, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite values")
    if np.any(array < 0):
        raise ValueError(f"{name} has negative values (min {array.min()})")
    return array


def _check_tokens(tokens) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens <= 0:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    return int(tokens)


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _counts_per_token(counts, tokens) -> tuple[np.ndarray, int]:
    """Validated counts [L, F] and tokens; a count above `tokens` is impossible and rejected."""
    counts = _as_values(counts, "counts", 2)
    tokens = _check_tokens(tokens)
    if counts.max() > tokens:
        raise ValueError(f"counts has a value {counts.max():g} above tokens={tokens} (at most one firing a token)")
    return counts, tokens


def top_k_size(fraction: float, n: int) -> int:
    """Number of neurons in "the top `fraction` of n": floor(fraction * n), but at least 1.

    Floor, so a hot set sized from a memory budget never exceeds the budget. The product is rounded to 9
    decimals before the floor so that float noise (0.29 * 100 = 28.999999999999996) does not lose a neuron.

    Args:
      fraction: in (0, 1].
      n: number of neurons to choose from, >= 1.

    Returns:
      k with 1 <= k <= n.
    """
    fraction = _check_fraction(fraction, "fraction")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return max(1, min(int(n), math.floor(round(fraction * n, 9))))


def _rank_descending(values: np.ndarray) -> np.ndarray:
    """Indices sorting the last axis by value, largest first; equal values keep ascending index order."""
    return np.argsort(-values, axis=-1, kind="stable")


# ------------------------------------------------------------------------------------------------ firing rate


def firing_rate(counts: Int[np.ndarray, "L F"], tokens: int) -> Float[np.ndarray, " L"]:
    """Fraction of (token, neuron) pairs of each layer in which the neuron fired.

    Args:
      counts: firing counts [L, F], each in [0, tokens].
      tokens: number of profiled tokens, > 0.

    Returns:
      float64 [L]: counts.sum(1) / (tokens * F).
    """
    counts, tokens = _counts_per_token(counts, tokens)
    return counts.sum(axis=1) / (tokens * counts.shape[1])


def sparsity(counts: Int[np.ndarray, "L F"], tokens: int) -> Float[np.ndarray, " L"]:
    """Fraction of (token, neuron) pairs of each layer in which the neuron stayed silent: 1 - firing_rate.

    Args:
      counts: firing counts [L, F], each in [0, tokens].
      tokens: number of profiled tokens, > 0.

    Returns:
      float64 [L].
    """
    return 1.0 - firing_rate(counts, tokens)


def model_firing_rate(counts: Int[np.ndarray, "L F"], tokens: int) -> float:
    """Fraction of all (token, layer, neuron) triples that fired: counts.sum() / (tokens * L * F).

    Equals the mean of `firing_rate` over layers, since every layer has the same F and token count.

    Args:
      counts: firing counts [L, F], each in [0, tokens].
      tokens: number of profiled tokens, > 0.
    """
    counts, tokens = _counts_per_token(counts, tokens)
    return float(counts.sum() / (tokens * counts.size))


# ------------------------------------------------------------------------------------------------ coverage


def coverage_curve(counts_1d: Real[np.ndarray, " N"]) -> tuple[Float[np.ndarray, " N+1"], Float[np.ndarray, " N+1"]]:
    """Share of all firings held by the most active x fraction of neurons, for x = 0, 1/N, ..., 1.

    Neurons are sorted by count, largest first. The curve starts at (0, 0), ends at (1, 1), and is concave.

    Args:
      counts_1d: non-negative counts (or magnitude sums) [N].

    Returns:
      (neuron_fraction, firing_fraction), both float64 [N + 1]: neuron_fraction[k] = k / N and
      firing_fraction[k] = share of the total held by the top k neurons. If every count is 0 the
      firing_fraction is all nan (no firings to share out).
    """
    counts = _as_values(counts_1d, "counts_1d", 1)
    n = counts.size
    neuron_fraction = np.arange(n + 1) / n
    cumulative = np.concatenate([[0.0], np.cumsum(np.sort(counts)[::-1])])
    total = cumulative[-1]  # not counts.sum(): float sums in another order could leave the end short of 1
    if total == 0:
        return neuron_fraction, np.full(n + 1, np.nan)
    return neuron_fraction, cumulative / total


def coverage_fraction(counts_1d: Real[np.ndarray, " N"], level: float = 0.8) -> float:
    """Smallest fraction of neurons whose firings reach `level` of all firings.

    Discrete definition: k / N, where k is the smallest number of top neurons (by count, largest first)
    whose cumulative share of the total is >= level. PowerInfer reports 26% of neurons holding 80% of
    activations in OPT-30B, 43% in LLaMA2-ReGLU-70B and 69% with SwiGLU.

    Args:
      counts_1d: non-negative counts (or magnitude sums) [N].
      level: target share of all firings, in (0, 1]. level = 1 gives the fraction of neurons that ever fired.

    Returns:
      k / N in (0, 1]; nan if every count is 0.
    """
    level = _check_fraction(level, "level")
    _, share = coverage_curve(counts_1d)
    if np.isnan(share[-1]):
        return math.nan
    # share[k] is the share of the top k neurons; shares are correctly rounded quotients, so a level that
    # is exactly attainable (7 of 10 firings at level 0.7) compares equal rather than missing by one ulp.
    k = int(np.searchsorted(share[1:], level, side="left")) + 1
    return min(k, share.size - 1) / (share.size - 1)


def coverage_per_layer(counts: Real[np.ndarray, "L F"], level: float = 0.8) -> Float[np.ndarray, " L"]:
    """`coverage_fraction` of each layer on its own.

    Args:
      counts: non-negative counts (or magnitude sums) [L, F].
      level: target share of the layer's firings, in (0, 1].

    Returns:
      float64 [L]; nan for a layer whose counts are all 0.
    """
    counts = _as_values(counts, "counts", 2)
    level = _check_fraction(level, "level")
    return np.array([coverage_fraction(row, level) for row in counts])


def coverage_model(counts: Real[np.ndarray, "L F"], level: float = 0.8) -> float:
    """`coverage_fraction` of all L * F neurons pooled: the fraction of the whole model holding `level`.

    Args:
      counts: non-negative counts (or magnitude sums) [L, F].
      level: target share of all firings, in (0, 1].

    Returns:
      A fraction of L * F in (0, 1]; nan if every count is 0.
    """
    counts = _as_values(counts, "counts", 2)
    return coverage_fraction(counts.reshape(-1), level)


# ------------------------------------------------------------------------------------------------ inequality


def lorenz_curve(values_1d: Real[np.ndarray, " N"]) -> tuple[Float[np.ndarray, " N+1"], Float[np.ndarray, " N+1"]]:
    """Lorenz curve: share of the total held by the least active x fraction, values sorted ascending.

    Args:
      values_1d: non-negative values [N].

    Returns:
      (population_fraction, value_share), both float64 [N + 1], starting at (0, 0) and ending at (1, 1);
      value_share is all nan if every value is 0.
    """
    values = _as_values(values_1d, "values_1d", 1)
    n = values.size
    population_fraction = np.arange(n + 1) / n
    cumulative = np.concatenate([[0.0], np.cumsum(np.sort(values))])
    if cumulative[-1] == 0:
        return population_fraction, np.full(n + 1, np.nan)
    return population_fraction, cumulative / cumulative[-1]


def gini(values_1d: Real[np.ndarray, " N"]) -> float:
    """Gini coefficient: 0 when all values are equal, (N - 1) / N when a single value holds everything.

    Sorted formula, values x_(1) <= ... <= x_(N): G = 2 * sum_i i * x_(i) / (N * sum_i x_i) - (N + 1) / N,
    which equals the mean absolute difference over all ordered pairs divided by twice the mean, and
    1 - 2 * (trapezoidal area under `lorenz_curve`).

    Args:
      values_1d: non-negative values [N].

    Returns:
      G in [0, (N - 1) / N]; nan if every value is 0.
    """
    values = np.sort(_as_values(values_1d, "values_1d", 1))
    n = values.size
    total = values.sum()
    if total == 0:
        return math.nan
    ranks = np.arange(1, n + 1)
    return float(2.0 * np.dot(ranks, values) / (n * total) - (n + 1) / n)


# ------------------------------------------------------------------------------------------------ hot / cold


def hot_mask_per_layer(counts: Real[np.ndarray, "L F"], budget_fraction: float) -> Bool[np.ndarray, "L F"]:
    """The top `budget_fraction` of each layer's neurons by count: the neurons to keep on the fast device.

    Each layer gets exactly k = `top_k_size(budget_fraction, F)` = max(1, floor(budget_fraction * F)) hot
    neurons. Ties are broken by index: among equal counts the lower neuron index is hot.

    Args:
      counts: non-negative counts (or magnitude sums) [L, F].
      budget_fraction: fraction of each layer's neurons that are hot, in (0, 1].

    Returns:
      bool [L, F] with exactly k True per row.
    """
    counts = _as_values(counts, "counts", 2)
    budget_fraction = _check_fraction(budget_fraction, "budget_fraction")
    k = top_k_size(budget_fraction, counts.shape[1])
    mask = np.zeros(counts.shape, dtype=bool)
    np.put_along_axis(mask, _rank_descending(counts)[:, :k], True, axis=1)
    return mask


def hot_mask_global(counts: Real[np.ndarray, "L F"], budget_neurons: int) -> Bool[np.ndarray, "L F"]:
    """The top `budget_neurons` neurons of the whole model by count, wherever their layer.

    Ties are broken by flat (row-major) index: among equal counts, the lower layer, then the lower neuron
    index, is hot.

    Args:
      counts: non-negative counts (or magnitude sums) [L, F].
      budget_neurons: number of hot neurons, in [0, L * F].

    Returns:
      bool [L, F] with exactly `budget_neurons` True.
    """
    counts = _as_values(counts, "counts", 2)
    if isinstance(budget_neurons, bool) or not isinstance(budget_neurons, numbers.Integral):
        raise ValueError(f"budget_neurons must be an integer, got {budget_neurons!r}")
    if not 0 <= budget_neurons <= counts.size:
        raise ValueError(f"budget_neurons must be in [0, L * F = {counts.size}], got {budget_neurons}")
    mask = np.zeros(counts.size, dtype=bool)
    mask[_rank_descending(counts.reshape(-1))[: int(budget_neurons)]] = True
    return mask.reshape(counts.shape)


def hot_share(counts: Real[np.ndarray, "L F"], hot_mask: Bool[np.ndarray, "L F"]) -> float:
    """Share of all firings (over all layers) made by the hot neurons.

    Args:
      counts: non-negative counts (or magnitude sums) [L, F].
      hot_mask: bool [L, F], True for hot neurons.

    Returns:
      counts[hot_mask].sum() / counts.sum() in [0, 1]; nan if every count is 0.
    """
    counts = _as_values(counts, "counts", 2)
    hot_mask = np.asarray(hot_mask)
    if hot_mask.dtype != np.bool_ or hot_mask.shape != counts.shape:
        raise ValueError(f"hot_mask must be bool of shape {counts.shape}, got {hot_mask.dtype} {hot_mask.shape}")
    total = counts.sum()
    if total == 0:
        return math.nan
    return float(counts[hot_mask].sum() / total)


# ------------------------------------------------------------------------------------------------ stability


def _top_set_intersections(counts_a, counts_b, fraction) -> tuple[np.ndarray, int]:
    """Per layer |top_a ∩ top_b| [L] and the common top-set size k."""
    counts_a = _as_values(counts_a, "counts_a", 2)
    counts_b = _as_values(counts_b, "counts_b", 2)
    if counts_a.shape != counts_b.shape:
        raise ValueError(f"counts_a {counts_a.shape} and counts_b {counts_b.shape} must have the same [L, F]")
    fraction = _check_fraction(fraction, "fraction")
    top_a = hot_mask_per_layer(counts_a, fraction)
    top_b = hot_mask_per_layer(counts_b, fraction)
    return (top_a & top_b).sum(axis=1), top_k_size(fraction, counts_a.shape[1])


def top_set_overlap(
    counts_a: Real[np.ndarray, "L F"], counts_b: Real[np.ndarray, "L F"], fraction: float = 0.2
) -> Float[np.ndarray, " L"]:
    """Per layer, the share of one profile's top neurons that are also top neurons in the other.

    "Top" is `hot_mask_per_layer(counts, fraction)` (k = max(1, floor(fraction * F)) neurons, ties by
    index), so both sets have k neurons and |top_a ∩ top_b| / |top_a| is symmetric in a and b. PowerInfer
    reports > 90% across tasks for the hot set.

    Args:
      counts_a: counts [L, F] from one corpus or domain.
      counts_b: counts [L, F] from another, same shape.
      fraction: size of the top set as a fraction of F, in (0, 1].

    Returns:
      float64 [L] in [0, 1].
    """
    intersection, k = _top_set_intersections(counts_a, counts_b, fraction)
    return intersection / k


def top_set_jaccard(
    counts_a: Real[np.ndarray, "L F"], counts_b: Real[np.ndarray, "L F"], fraction: float = 0.2
) -> Float[np.ndarray, " L"]:
    """Per layer Jaccard index |top_a ∩ top_b| / |top_a ∪ top_b| of the two top sets (see `top_set_overlap`).

    With equal set sizes k and intersection i this is i / (2k - i), never above the overlap i / k.

    Args:
      counts_a: counts [L, F] from one corpus or domain.
      counts_b: counts [L, F] from another, same shape.
      fraction: size of the top set as a fraction of F, in (0, 1].

    Returns:
      float64 [L] in [0, 1].
    """
    intersection, k = _top_set_intersections(counts_a, counts_b, fraction)
    return intersection / (2 * k - intersection)
