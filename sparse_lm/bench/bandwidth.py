"""Memory read bandwidth of this machine as XLA sees it: the floor every decode benchmark is held to."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def measure_read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-`repeats` bytes/s of a jitted full reduction over an `n_bytes` float32 array.

    A sum reads every byte once and writes nothing, so its speed is the read bandwidth available to
    XLA's CPU runtime with the threads it uses (both cores here).
    """
    if n_bytes < 4 or repeats < 1:
        raise ValueError(f"need n_bytes >= 4 and repeats >= 1, got {n_bytes}, {repeats}")
    data = jnp.ones((n_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(data).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total(data).block_until_ready()
        best = min(best, time.perf_counter() - start)
    del data
    return n_bytes / best
