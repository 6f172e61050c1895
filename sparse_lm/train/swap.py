"""The activation swap of a pretrained model during training: calibrated gate thresholds and staged swapping.

A staged swap changes the FFN activation of the bottom group of layers first and one more group every
`stage_steps` steps; layers not yet swapped keep the original activation and no threshold.
"""

from __future__ import annotations

import numpy as np

from sparse_lm.models.config import Activation, ModelConfig, ThresholdTarget
from sparse_lm.models.transformer import Transformer
from sparse_lm.profiling.profiler import calibrate_thresholds, collect_abs_activations
from sparse_lm.train.config import SwapConfig

CALIBRATION_STRIDE = 4  # every 4th token's values enter the quantiles (keeps 16k tokens x 30 layers in memory)


def calibrate_gate_thresholds(
    original: Transformer, rows: np.ndarray, activation: Activation, cfg: SwapConfig, batch_size: int
) -> tuple[float, ...]:
    """Per layer t with `cfg.target_sparsity` of |sigma(gate)| at or below it, sigma the gate of `activation`,
    measured on the original model's gate pre-activations over the first `cfg.calibration_tokens` of `rows`."""
    if not activation.gated:
        raise ValueError(f"swap.target_sparsity calibrates gate thresholds: model.activation={activation.value} "
                         "has no gate")
    n_rows = max(1, -(-cfg.calibration_tokens // rows.shape[1]))
    values = collect_abs_activations(original, rows[:n_rows], cfg.calibration_tokens, batch_size,
                                     of=ThresholdTarget.gate, gate_of=activation)
    return tuple(float(t) for t in calibrate_thresholds(values[:, ::CALIBRATION_STRIDE], cfg.target_sparsity))


def layer_groups(n_layers: int, stages: int) -> list[np.ndarray]:
    """The layers swapped at each stage, bottom first (groups as equal as possible)."""
    if not 1 <= stages <= n_layers:
        raise ValueError(f"swap.stages must be in [1, n_layers={n_layers}], got {stages}")
    return np.array_split(np.arange(n_layers), stages)


def stage_at(cfg: SwapConfig, step: int) -> int:
    """How many layer groups are swapped at (0-based) `step`."""
    if cfg.stages == 1:
        return 1
    return min(cfg.stages, step // cfg.stage_steps + 1)


def swapped_layers(cfg: SwapConfig, n_layers: int, step: int) -> np.ndarray:
    groups = layer_groups(n_layers, cfg.stages)
    return np.concatenate(groups[: stage_at(cfg, step)])


def configure_swap(model: Transformer, swapped: np.ndarray, original: Activation) -> None:
    """Swapped layers get the model's configured activation and threshold; the others the original activation."""
    config: ModelConfig = model.config
    chosen = set(int(i) for i in swapped)
    for layer, block in enumerate(model.blocks):
        ffn = block.ffn
        if layer in chosen:
            ffn.activation, ffn.threshold = config.activation, config.layer_threshold(layer)
            ffn.threshold_on = config.ffn_threshold_on
        else:
            ffn.activation, ffn.threshold, ffn.threshold_on = original, None, ThresholdTarget.hidden
