"""What the sparse FFN kernels share: the active-set contract and its checks, implementation choice, tiling,
the dtype-keyed tolerance table, and the GPU lowering check.

Active set: `indices` int32 [K], padded to a static capacity K, and `count` (int32 scalar, 0 <= count <= K);
entries k >= count are padding, ignored by every implementation (their outputs are 0). Weights of the gate,
up and down projections are stored [F, D] so that a neuron is a row.
Legend: B tokens, D d_model, F d_ff, K capacity of the active set.
"""

from __future__ import annotations

import enum
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from kernels_pallas import cpu
from sparse_lm.models.config import Activation


class Implementation(str, enum.Enum):
    auto = "auto"  # ffi on CPU when built (else xla), pallas on GPU
    xla = "xla"  # reference.py: plain jnp (gather + dot), the oracle and the portable path
    pallas = "pallas"  # kernel.py; interpreted on CPU (tests), Triton on GPU
    ffi = "ffi"  # cpu/: the C++ twin through jax.ffi (CPU only, float32)

    def __str__(self) -> str:
        return self.value


def resolve(implementation: Implementation | str, interpret: bool | None = None) -> tuple[Implementation, bool]:
    """The implementation to run on the default backend and whether Pallas runs interpreted (None: exactly when
    the backend is the CPU; False on a CPU host only to lower for a GPU, see `export_for_gpu`)."""
    implementation = Implementation(implementation)
    on_cpu = jax.default_backend() == "cpu"
    if implementation is Implementation.auto:
        if on_cpu:
            implementation = Implementation.ffi if cpu.available() else Implementation.xla
        else:
            implementation = Implementation.pallas
    if implementation is Implementation.ffi and not on_cpu:
        raise ValueError(f"implementation=ffi runs on the CPU only; the backend is {jax.default_backend()}")
    return implementation, on_cpu if interpret is None else interpret


# rtol, atol of an implementation against the float32 reference (precision HIGHEST), by input dtype
TOLERANCES: dict[jnp.dtype, tuple[float, float]] = {
    jnp.dtype(jnp.float32): (1e-5, 1e-5),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.float16): (5e-3, 5e-3),
}


def tolerance(dtype) -> dict[str, float]:
    rtol, atol = TOLERANCES[jnp.dtype(dtype)]
    return {"rtol": rtol, "atol": atol}


def is_concrete(*values) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in values)


def check_active(indices: Int[Array, " K"], count, d_ff: int) -> None:
    """Raises ValueError for an active set that is not K int32 indices with count in [0, K] and the first
    `count` entries distinct and in [0, d_ff). Only concrete values can be checked: under jit it is a no-op,
    so check before tracing (the engine checks what its predictors produce in tests)."""
    if not is_concrete(indices, count):
        return
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"active indices must be a 1-D integer array, got {idx.dtype} of shape {idx.shape}")
    n = int(np.asarray(count))
    if not 0 <= n <= idx.shape[0]:
        raise ValueError(f"active count {n} outside [0, capacity {idx.shape[0]}]")
    valid = idx[:n]
    bad = valid[(valid < 0) | (valid >= d_ff)]
    if bad.size:
        raise ValueError(f"active indices out of range [0, {d_ff}): {bad[:8].tolist()}")
    values, counts = np.unique(valid, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"duplicate active indices: {values[counts > 1][:8].tolist()}")


def resolve_gate_threshold(gate_threshold: float | None, activation: Activation) -> float | None:
    """A kernel's gate threshold (a neuron's activation is 0 unless |sigma(gate)| > it) as a Python float, or None
    for no threshold (None or -inf). It is static: the Pallas kernels and the C++ twin take it as a constant.
    Raises for an ungated activation, which has no gate to threshold."""
    if gate_threshold is None or float(gate_threshold) == -math.inf:
        return None
    if not activation.gated:
        raise ValueError(f"a gate threshold needs a gated activation, not {activation.value}")
    return float(gate_threshold)


def valid_mask(capacity: int, count) -> jax.Array:
    return jnp.arange(capacity) < count


def power_of_two_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n (Triton tiles must have power-of-two sizes)."""
    tile = 1
    while tile * 2 <= cap and n % (tile * 2) == 0:
        tile *= 2
    return tile


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def pallas_active_rows(indices: Int[Array, " K"], max_block: int) -> tuple[jax.Array, int]:
    """Indices padded to a whole number of power-of-two blocks (the Triton tile rule), and the block size."""
    capacity = indices.shape[0]
    block = min(max_block, next_power_of_two(capacity))
    padded = -(-capacity // block) * block
    return jnp.pad(indices.astype(jnp.int32), (0, padded - capacity)), block


TRITON_CALL = "__gpu$xla.gpu.triton"


def export_for_gpu(fn, *args) -> jax.export.Exported:
    """Lowers `fn(*args)` for CUDA on any machine (checks the Pallas kernels' GPU lowering without a GPU).

    Triton kernels are embedded as a custom call without a compatibility guarantee, which export refuses unless
    told; the Triton IR itself is compiled only by XLA on a GPU."""
    return jax.export.export(
        jax.jit(fn), platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    )(*args)
