"""Adaptive predictor sizing: per layer, the smallest rank whose predictor, at the recall-calibrated
threshold, predicts at most `max_over_true` times the truly active neurons.

The constraint is per layer, so choosing each layer's smallest qualifying rank minimises the total size.
A layer no candidate satisfies gets the candidate closest to the bound. PowerInfer sizes from the layer's
sparsity and skewness; here those enter through the measurement itself (a sparse, skewed layer reaches the
bound at a small rank), and the profile's per-layer sparsity is reported beside the choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
