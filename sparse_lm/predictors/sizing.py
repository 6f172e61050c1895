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
