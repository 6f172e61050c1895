"""Sparse gate/up: activations of the active FFN neurons only."""

from kernels_pallas.sparse_gate_up.api import sparse_gate_up
from kernels_pallas.sparse_gate_up.reference import sparse_gate_up_reference

__all__ = ["sparse_gate_up", "sparse_gate_up_reference"]
