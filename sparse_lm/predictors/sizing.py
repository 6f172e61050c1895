"""Adaptive predictor sizing, three ways.

- `choose_ranks`: per layer, the smallest rank whose predictor, at the recall-calibrated threshold, predicts at
  most `max_over_true` times the truly active neurons (the constraint is per layer, so this minimises the total
  size; a layer no candidate satisfies gets the candidate closest to the bound).
- `allocate_ranks`: under a total size, the ranks maximising a measured per-layer score (exact).
- `profile_guided_ranks`: PowerInfer's prior, without training any candidate: a layer's predictor grows with its
  firing density and shrinks with its skewness, both read from the profile of the same pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from sparse_lm.predictors.metrics import LayerMetrics


def choose_ranks(
    candidates: Mapping[int, Sequence[LayerMetrics]], max_over_true: float
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Per layer, the chosen rank and whether it meets the bound.

    Args:
      candidates: rank -> per-layer metrics of the predictors trained at that rank (same layers for all).
      max_over_true: bound on predicted_active / true_active (PowerInfer-style budget, e.g. 1.25).
    """
    if not candidates:
        raise ValueError("no candidate ranks")
    if max_over_true < 1:
        raise ValueError(f"sizing.max_over_true must be >= 1, got {max_over_true}")
    ranks = sorted(candidates)
    n_layers = {len(metrics) for metrics in candidates.values()}
    if len(n_layers) != 1:
        raise ValueError(f"candidate ranks cover different layer counts: {sorted(n_layers)}")
    chosen, met = [], []
    for layer in range(n_layers.pop()):
        fitting = [r for r in ranks if candidates[r][layer].predicted_over_true <= max_over_true]
        if fitting:
            chosen.append(fitting[0])
            met.append(True)
        else:
            chosen.append(min(ranks, key=lambda r: candidates[r][layer].predicted_over_true))
            met.append(False)
    return tuple(chosen), tuple(met)


def uniform_rank_of_equal_size(ranks: Sequence[int]) -> int:
    """The single rank whose predictors have the same total size as `ranks` (predictor size is linear in the
    rank for fixed d_model and d_ff)."""
    return max(1, round(sum(ranks) / len(ranks)))


def allocate_ranks(scores: Mapping[int, Sequence[float]], budget: int) -> tuple[int, ...]:
    """Per-layer ranks from the candidates maximising the summed score with the ranks summing to at most
    `budget` (predictor size is linear in the rank, so this is a size budget). Exact dynamic programme.

    Args:
      scores: rank -> per-layer score (e.g. recall at a fixed prediction budget) of the predictor at that rank.
      budget: total rank over all layers (n_layers x r gives the size of one uniform rank r).
    """
    ranks = sorted(scores)
    n_layers = len(scores[ranks[0]])
    if ranks[0] * n_layers > budget:
        raise ValueError(f"budget {budget} is below the smallest allocation ({ranks[0]} x {n_layers} layers)")
    # best[b] = (score, choice) of the layers so far using total rank b exactly; unreachable totals are absent
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for layer in range(n_layers):
        step: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (score, choice) in best.items():
            for rank in ranks:
                total = used + rank
                if total > budget:
                    continue
                candidate = (score + float(scores[rank][layer]), (*choice, rank))
                if total not in step or candidate[0] > step[total][0]:
                    step[total] = candidate
        best = step
    return max(best.values(), key=lambda item: item[0])[1]


def profile_guided_ranks(
    sparsity: Sequence[float], coverage: Sequence[float], candidates: Sequence[int], budget: int
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Per-layer ranks from the profile alone (PowerInfer's rule of thumb: sparser and more skewed layers need
    smaller predictors), and the unrounded target ranks.

    Each layer's target rank is proportional to density x coverage, where density = 1 - sparsity and coverage
    is the share of neurons holding 80% of the layer's firings (small when skewed), scaled so the targets sum
    to `budget`; the candidate ranks closest to the targets in log scale within the budget are returned.
    """
    density = 1 - np.asarray(sparsity, np.float64)
    spread = np.asarray(coverage, np.float64)
    if density.shape != spread.shape or density.ndim != 1 or density.size == 0:
        raise ValueError(f"sparsity and coverage must be per-layer lists of one length, got {density.shape} and "
                         f"{spread.shape}")
    if not np.all(np.isfinite(density * spread)) or np.any(density * spread < 0):
        raise ValueError("sparsity must be in [0, 1] and coverage non-negative")
    weight = density * spread
    if weight.sum() == 0:
        weight = np.ones_like(weight)
    target = budget * weight / weight.sum()
    scores = {int(r): [-abs(math.log(r / max(t, 1e-9))) for t in target] for r in candidates}
    return allocate_ranks(scores, budget), tuple(float(t) for t in target)
