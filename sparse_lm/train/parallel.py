"""Data parallelism through JAX SPMD: a 1-D device mesh, replicated state, batches sharded by rows.

The same program runs on 1 device or N (emulated CPU devices in tests, GPUs, or `jax.distributed` hosts):
only the shardings change, and XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: int) -> Mesh:
    """A mesh over the first `devices` devices (0: all of them) with one axis, `data`."""
    available = jax.device_count()
    count = devices or available
    if count > available:
        raise ValueError(
            f"train.devices={devices} but only {available} device(s) are visible "
            "(on CPU, emulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    return Mesh(jax.devices()[:count], (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches laid out [A micro-batches, B rows, L] are split over devices by rows."""
    return NamedSharding(mesh, P(None, DATA_AXIS, None))


def check_divisible(rows_per_micro_batch: int, mesh: Mesh) -> None:
    if rows_per_micro_batch % mesh.size:
        raise ValueError(
            f"train.batch_size / train.accum_steps = {rows_per_micro_batch} rows per micro-batch cannot be "
            f"split over {mesh.size} devices"
        )
