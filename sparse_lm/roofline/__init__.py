"""Roofline cost model: hardware profiles, per-op FLOPs and bytes, and decode projections under offload policies."""

from sparse_lm.roofline.hardware import (
    PROFILES,
    HardwareProfile,
    HardwareSpec,
    get_profile,
    known_profiles,
    load_calibration,
)
from sparse_lm.roofline.ops import (
    Component,
    Op,
    Phase,
    attention_ops,
    embedding_ops,
    ffn_ops,
    head_ops,
    layer_ops,
    predictor_ops,
    predictor_rank,
    total,
    weight_bytes,
)
from sparse_lm.roofline.project import (
    GPU_INT4_BANDWIDTH_EFFICIENCY,
    CostParams,
    MemoryPlan,
    NeuronSplit,
    Policy,
    Projection,
    gpu_ffn_capacity,
    plan_memory,
    project_decode,
)
from sparse_lm.roofline.roofline import Tier, analyze, cpu_tier, gpu_tier, pcie_bandwidth
from sparse_lm.roofline.shapes import SHAPES, ModelShape, Precision, get_shape

__all__ = [
    "GPU_INT4_BANDWIDTH_EFFICIENCY",
    "PROFILES", "SHAPES", "Component", "CostParams", "HardwareProfile", "HardwareSpec", "MemoryPlan", "ModelShape",
    "NeuronSplit", "Op", "Phase", "Policy", "Precision", "Projection", "Tier", "analyze", "attention_ops",
    "cpu_tier", "embedding_ops", "ffn_ops", "get_profile", "get_shape", "gpu_ffn_capacity", "gpu_tier", "head_ops",
    "known_profiles", "layer_ops", "load_calibration", "pcie_bandwidth", "plan_memory", "predictor_ops",
    "predictor_rank", "project_decode", "total", "weight_bytes",
]
