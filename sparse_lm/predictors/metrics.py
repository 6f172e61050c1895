"""Predictor quality: threshold calibration to a target recall, and per-layer recall / precision / F1,
predicted and true active fractions and the activation mass of missed neurons.

Legend: T tokens, F d_ff.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Bool, Float


def calibrate_threshold(
    logits: Float[np.ndarray, "T F"], fired: Bool[np.ndarray, "T F"], target_recall: float
) -> float:
    """The largest logit threshold t such that predicting `logits > t` recalls >= `target_recall` of the
    firings (over all tokens and neurons pooled)."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    positives = np.sort(logits[fired].astype(np.float64))
    if positives.size == 0:
        return float("inf")  # nothing fires: predict nothing
    # keep the top ceil(target * n) positive logits: t just below the smallest kept one
    keep = int(np.ceil(target_recall * positives.size))
    smallest_kept = positives[positives.size - keep]
    # the next float32 below: thresholds are stored in float32, where a float64 step would round back up
    return float(np.nextafter(np.float32(smallest_kept), np.float32(-np.inf)))


def budget_threshold(logits: Float[np.ndarray, "T F"], fired: Bool[np.ndarray, "T F"], ratio: float) -> float:
    """The logit threshold predicting `ratio` times as many (token, neuron) cells as fire: the operating point
    of a fixed compute budget, at which recall shows the predictor's quality."""
    if ratio <= 0:
        raise ValueError(f"budget ratio must be positive, got {ratio}")
    n_predicted = min(int(round(ratio * int(fired.sum()))), logits.size)
    if n_predicted == 0:
        return float("inf")
    flat = np.sort(logits.reshape(-1).astype(np.float64))
    return float(np.nextafter(flat[flat.size - n_predicted], -np.inf))


@dataclasses.dataclass(frozen=True)
class LayerMetrics:
    recall: float
    precision: float
    f1: float
    predicted_active: float  # share of neurons predicted to fire, per token
    true_active: float  # share that fire
    missed_mass: float  # sum of |a| over fired-but-not-predicted neurons / sum of |a| over all neurons

    @property
    def predicted_over_true(self) -> float:
        return self.predicted_active / self.true_active if self.true_active > 0 else float("inf")


class MetricsAccumulator:
    """Streams batches of (predicted, fired, |a|) into confusion counts and masses."""

    def __init__(self):
        self.tp = self.fp = self.fn = self.cells = 0
        self.missed = self.total_mass = 0.0

    def add(
        self,
        predicted: Bool[np.ndarray, "T F"],
        fired: Bool[np.ndarray, "T F"],
        abs_hidden: Float[np.ndarray, "T F"] | None = None,
    ) -> None:
        self.tp += int(np.sum(predicted & fired))
        self.fp += int(np.sum(predicted & ~fired))
        self.fn += int(np.sum(~predicted & fired))
        self.cells += predicted.size
        if abs_hidden is not None:
            abs_hidden = abs_hidden.astype(np.float64)
            self.missed += float(np.sum(abs_hidden[fired & ~predicted]))
            self.total_mass += float(np.sum(abs_hidden))

    def result(self) -> LayerMetrics:
        positives, predicted = self.tp + self.fn, self.tp + self.fp
        recall = self.tp / positives if positives else 1.0
        precision = self.tp / predicted if predicted else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return LayerMetrics(
            recall=recall,
            precision=precision,
            f1=f1,
            predicted_active=predicted / self.cells if self.cells else float("nan"),
            true_active=positives / self.cells if self.cells else float("nan"),
            missed_mass=self.missed / self.total_mass if self.total_mass else float("nan"),
        )
