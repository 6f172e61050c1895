"""Sparse FFN: gate/up and down over the active neurons only."""

from kernels_pallas.sparse_ffn.api import sparse_ffn
from kernels_pallas.sparse_ffn.reference import active_neuron_mask, masked_dense_ffn

__all__ = ["active_neuron_mask", "masked_dense_ffn", "sparse_ffn"]
