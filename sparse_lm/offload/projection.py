"""A placement's projected decode speed on a GPU machine, beside the baselines at the same GPU memory: the cost
model (sparse_lm.roofline) with the GPU's memory replaced by the budget. Legend: L layers, F neurons per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jaxtyping import Bool, Float

from sparse_lm.offload.placement import min_fast_neurons
from sparse_lm.roofline.hardware import HardwareProfile
from sparse_lm.roofline.project import CostParams, NeuronSplit, Policy, gpu_ffn_capacity, project_decode
from sparse_lm.roofline.shapes import ModelShape, Precision

BASELINES = (Policy.layer_split, Policy.flexgen, Policy.all_fast)


@dataclasses.dataclass(frozen=True)
class GpuSetting:
    """A GPU machine with `budget_bytes` of GPU memory, and what decode needs on it.

    Attributes:
      hardware: the machine, its GPU memory replaced by the budget.
      context, kv_capacity: tokens attended to by the projected step and tokens of KV cache allocated.
      predictor_params: weights of all PowerInfer predictors (on the GPU before any neuron).
    """

    hardware: HardwareProfile
    precision: Precision
    context: int
    kv_capacity: int
    predictor_params: float
    params: CostParams = CostParams()

    @classmethod
    def with_budget(cls, hardware: HardwareProfile, budget_bytes: int, **kwargs) -> GpuSetting:
        if not hardware.has_gpu:
            raise ValueError(f"hardware={hardware.name}: a placement projection needs a machine with a GPU")
        return cls(dataclasses.replace(hardware, gpu_memory_bytes=float(budget_bytes)), **kwargs)

    def ffn_capacity(self, shape: ModelShape) -> int:
        """FFN neurons that fit on the GPU once attention, predictors, KV cache and (if room) the head are there."""
        return gpu_ffn_capacity(shape, self.hardware, precision=self.precision, kv_capacity=self.kv_capacity,
                                predictor_params=self.predictor_params, params=self.params)

    def min_neurons(self, shape: ModelShape) -> int:
        """PowerInfer's communication constraint: a layer split over both tiers pays two hand-offs, so it needs
        enough GPU neurons to save that much over computing them on the CPU."""
        hardware = self.hardware
        return min_fast_neurons(
            shape.neuron_params * self.precision.bytes_per_weight,
            hardware.gpu_bandwidth * hardware.bandwidth_efficiency,
            hardware.cpu_bandwidth * hardware.bandwidth_efficiency,
            2 * self.params.handoff_s,
        )


def project_placement(
    shape: ModelShape, setting: GpuSetting, mask: Bool[np.ndarray, "L F"], frequencies: Float[np.ndarray, "L F"]
) -> dict[str, Any]:
    """PowerInfer's projected decode with this placement: its GPU neurons serve their share of the firings."""
    split = NeuronSplit.from_mask(mask, frequencies)
    projection = project_decode(
        shape, setting.hardware, Policy.powerinfer, precision=setting.precision, context=setting.context,
        kv_capacity=setting.kv_capacity, active_fraction=np.asarray(frequencies).mean(axis=1), split=split,
        predictor_params=setting.predictor_params, params=setting.params,
    )
    return projection.to_dict()


def project_baselines(shape: ModelShape, setting: GpuSetting) -> dict[str, dict[str, Any]]:
    """The dense baselines at the same GPU memory, by policy name (all_fast flags whether the model fits)."""
    out = {}
    for policy in BASELINES:
        projection = project_decode(
            shape, setting.hardware, policy, precision=setting.precision, context=setting.context,
            kv_capacity=setting.kv_capacity, params=setting.params,
        )
        out[policy.value] = projection.to_dict()
    return out
