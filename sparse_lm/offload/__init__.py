"""Hybrid offload: neuron placement (ILP and greedy), the device/host hybrid engine and its baselines, the disk tier."""

from sparse_lm.offload.baselines import LayerSplitConfig, install_flexgen, install_layer_split
from sparse_lm.offload.disk import ensure_bundle, measure_disk
from sparse_lm.offload.disk_cache import DiskTierConfig, NaiveLayerLoader, NeuronCache
from sparse_lm.offload.disk_decode import install_disk_tier
from sparse_lm.offload.gpu_index import read_gpu_index, write_gpu_index
from sparse_lm.offload.hybrid import HybridConfig, install_hybrid
from sparse_lm.offload.memory_tiers import export_for_cuda, offload_markers, remove_offload
from sparse_lm.offload.placement import (
    Placement,
    PlacementInfeasible,
    greedy_placement,
    ilp_placement,
    min_fast_neurons,
    place,
)
from sparse_lm.offload.profile_synth import synthetic_frequencies

__all__ = [
    "DiskTierConfig",
    "NaiveLayerLoader",
    "NeuronCache",
    "ensure_bundle",
    "install_disk_tier",
    "measure_disk",
    "HybridConfig",
    "LayerSplitConfig",
    "Placement",
    "PlacementInfeasible",
    "export_for_cuda",
    "greedy_placement",
    "ilp_placement",
    "install_flexgen",
    "install_hybrid",
    "install_layer_split",
    "min_fast_neurons",
    "offload_markers",
    "place",
    "read_gpu_index",
    "remove_offload",
    "synthetic_frequencies",
    "write_gpu_index",
]
