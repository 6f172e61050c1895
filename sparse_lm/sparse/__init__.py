"""Sparse execution of the FFN: the decode engine built on kernels_pallas (predictor -> active neurons -> sparse
kernels)."""

from sparse_lm.sparse.engine import (
    SparseEngineConfig,
    SparseExecutor,
    active_mask,
    active_set,
    choose_capacities,
    gate_threshold_of,
    install,
    predicted_counts,
    remove,
)

__all__ = [
    "SparseEngineConfig",
    "SparseExecutor",
    "active_mask",
    "active_set",
    "choose_capacities",
    "gate_threshold_of",
    "install",
    "predicted_counts",
    "remove",
]
