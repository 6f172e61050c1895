"""Neuron-aware sparse FFN operators: per op a plain-jnp reference (the XLA path and the oracle), a Pallas kernel
(Triton on GPU, interpreted on CPU) and an api choosing between them."""

from kernels_pallas.common import TOLERANCES, Implementation, check_active, export_for_gpu, tolerance
from kernels_pallas.sparse_down import sparse_down, sparse_down_reference
from kernels_pallas.sparse_ffn import active_neuron_mask, masked_dense_ffn, sparse_ffn
from kernels_pallas.sparse_gate_up import sparse_gate_up, sparse_gate_up_reference

__all__ = [
    "TOLERANCES",
    "Implementation",
    "active_neuron_mask",
    "check_active",
    "export_for_gpu",
    "masked_dense_ffn",
    "sparse_down",
    "sparse_down_reference",
    "sparse_ffn",
    "sparse_gate_up",
    "sparse_gate_up_reference",
    "tolerance",
]
