"""Small shared utilities: atomic file writes, machine description."""

from sparse_lm.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
