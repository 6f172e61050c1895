"""Sparse down projection: the active rows of W_down, weighted by their activations."""

from kernels_pallas.sparse_down.api import sparse_down
from kernels_pallas.sparse_down.reference import sparse_down_reference

__all__ = ["sparse_down", "sparse_down_reference"]
