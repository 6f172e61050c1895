"""Activation predictors: per-layer low-rank MLPs deciding which FFN neurons fire, their data, training,
threshold calibration, metrics and storage."""

from sparse_lm.predictors.metrics import LayerMetrics, MetricsAccumulator, calibrate_threshold
from sparse_lm.predictors.module import HiddenActivation, LowRankPredictor, PredictorSet
from sparse_lm.predictors.store import attach, load_predictors, save_predictors
from sparse_lm.predictors.train import PredictorLoss, PredictorTrainConfig

__all__ = [
    "HiddenActivation",
    "LayerMetrics",
    "LowRankPredictor",
    "MetricsAccumulator",
    "PredictorLoss",
    "PredictorSet",
    "PredictorTrainConfig",
    "attach",
    "calibrate_threshold",
    "load_predictors",
    "save_predictors",
]
