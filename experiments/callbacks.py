"""Hydra callbacks: after a sweep, one result record from all of its runs."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sparse_lm.offload.report import collect_place_sweep
from sparse_lm.predictors.report import collect_predictor_sweep
from sparse_lm.results import current_command
from sparse_lm.train.report import collect_sweep


class SweepResult(Callback):
    """Writes `<results_dir>/<record_as>.json` from every finished run of the sweep directory."""

    def __init__(self, record_as: str, results_dir: str = "results", **labels: str):
        self.record_as = record_as
        self.results_dir = results_dir
        self.labels = labels  # optional title, table_title, notes of the record

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = collect_sweep(config.hydra.sweep.dir, self.record_as, self.results_dir, current_command(),
                             **self.labels)
        print(f"sweep result: {path}")


class PredictorSweepResult(SweepResult):
    """The same for a sweep of experiments/train_predictor.py (one row per run)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = collect_predictor_sweep(config.hydra.sweep.dir, self.record_as, self.results_dir, current_command())
        print(f"sweep result: {path}")


class PlacementSweepResult(SweepResult):
    """The same for a sweep of experiments/place.py (budget x solver x hardware)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = collect_place_sweep(config.hydra.sweep.dir, self.record_as, self.results_dir, current_command())
        print(f"sweep result: {path}")
