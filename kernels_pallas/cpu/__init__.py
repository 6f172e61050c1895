"""The C++ twin of the sparse FFN kernels on CPU (sparse_ffn_cpu.cc and quant_predict_cpu.cc through jax.ffi),
built by the package's install (setup.py) and registered with XLA on first use.

Legend: B tokens, D d_model, F d_ff, K capacity of the active set.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from sparse_lm.models.config import Activation

HERE = Path(__file__).resolve().parent
LIBRARY_STEM = "_sparse_ffn_cpu"
# the C++ enum Activation in sparse_ffn_cpu.cc
ACTIVATION_CODES = {Activation.swiglu: 0, Activation.reglu: 1, Activation.drelu: 2, Activation.relu: 3,
                    Activation.relu2: 4}
TARGETS = {"SparseGateUp": "sparse_lm_sparse_gate_up", "SparseDown": "sparse_lm_sparse_down",
           "PredictGateUp": "sparse_lm_predict_gate_up", "QuantScores": "sparse_lm_quant_scores",
           "QuantSparseFfn": "sparse_lm_quant_sparse_ffn"}


def library_path() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"{LIBRARY_STEM}{suffix}"
        if path.exists():
            return path
    return None


def available() -> bool:
    return library_path() is not None


@functools.cache
def register() -> None:
    """Loads the library and registers its handlers with XLA (once per process)."""
    path = library_path()
    if path is None:
        raise RuntimeError(
            f"the C++ sparse FFN library ({LIBRARY_STEM}*.so) is not built in {HERE}; reinstall the package "
            "(`pip install -e .` builds it with g++ and the jaxlib FFI headers) or use implementation=xla"
        )
    library = ctypes.cdll.LoadLibrary(str(path))
    for symbol, target in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


MADV_COLLAPSE = 25  # Linux >= 6.1: back a range with 2 MiB pages now, synchronously
HUGE_PAGE = 1 << 21


def collapse_to_huge_pages(*arrays: jax.Array) -> int:
    """Asks Linux to back the whole 2 MiB pages inside each CPU array's buffer with huge pages (MADV_COLLAPSE);
    returns the bytes collapsed (0 where unsupported). Gathering scattered rows crosses a 4 KiB page, and a TLB
    miss, every 1,024 floats; measured here: the 7B-shaped down projection at 10% active went from ~12-16 to
    ~19 GB/s. The arrays' values are unchanged."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for array in arrays:
        if not isinstance(array, jax.Array) or array.devices() != {jax.devices("cpu")[0]}:  # host numpy: skip
            continue
        start = array.unsafe_buffer_pointer()
        first = -(-start // HUGE_PAGE) * HUGE_PAGE
        last = (start + array.nbytes) // HUGE_PAGE * HUGE_PAGE
        if last > first and libc.madvise(first, last - first, MADV_COLLAPSE) == 0:
            collapsed += last - first
    return collapsed


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def ffi_gate_threshold(gate_threshold: float | None) -> np.float32:
    """The FFI attribute for a gate threshold: -inf (no threshold) for None."""
    return np.float32(-np.inf if gate_threshold is None else gate_threshold)


def _check_f32(**arrays) -> None:
    for name, array in arrays.items():
        if array is not None and array.dtype != jnp.float32:
            raise ValueError(f"the C++ sparse FFN takes float32; {name} is {array.dtype}")


def sparse_gate_up_cpu(
    x: Float[Array, "B D"], indices: Int[Array, " K"], count: Int[Array, ""], w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"], activation: Activation, threads: int | None = None,
    gate_threshold: float | None = None,
) -> Float[Array, "B K"]:
    """kernels_pallas.sparse_gate_up (gate_threshold: a neuron's activation is 0 unless |sigma(gate)| exceeds it;
    None or -inf: no threshold)."""
    register()
    _check_f32(x=x, w_gate=w_gate, w_up=w_up)
    gate = jnp.zeros((0, w_up.shape[1]), jnp.float32) if w_gate is None else w_gate  # empty: ungated
    call = jax.ffi.ffi_call(TARGETS["SparseGateUp"], jax.ShapeDtypeStruct((x.shape[0], indices.shape[0]), jnp.float32))
    return call(x, indices.astype(jnp.int32), jnp.reshape(count, (1,)).astype(jnp.int32), gate, w_up,
                activation=ACTIVATION_CODES[activation], gate_threshold=ffi_gate_threshold(gate_threshold),
                threads=threads or default_threads())


def sparse_down_cpu(
    hidden: Float[Array, "B K"], indices: Int[Array, " K"], count: Int[Array, ""], w_down: Float[Array, "F D"],
    threads: int | None = None,
) -> Float[Array, "B D"]:
    register()
    _check_f32(hidden=hidden, w_down=w_down)
    call = jax.ffi.ffi_call(TARGETS["SparseDown"],
                            jax.ShapeDtypeStruct((hidden.shape[0], w_down.shape[1]), jnp.float32))
    return call(hidden, indices.astype(jnp.int32), jnp.reshape(count, (1,)).astype(jnp.int32), w_down,
                threads=threads or default_threads())


def predict_gate_up_cpu(
    x: Float[Array, "1 D"], w1: Float[Array, "D R"], b1: Float[Array, " R"], w2: Float[Array, "R F"],
    b2: Float[Array, " F"], hidden_relu: bool, threshold: float, capacity: int, w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"], activation: Activation, threads: int | None = None,
    gate_threshold: float | None = None,
) -> tuple[Float[Array, "1 K"], Int[Array, " K"], Int[Array, " 1"]]:
    """One token with its predictor fused: the activations (gate threshold as in `sparse_gate_up_cpu`), ascending
    indices and count of the neurons whose predictor logits exceed `threshold` (the first `capacity` of them), as
    sparse_lm.sparse.active_set picks."""
    register()
    _check_f32(x=x, w1=w1, w2=w2, w_gate=w_gate, w_up=w_up)
    gate = jnp.zeros((0, w_up.shape[1]), jnp.float32) if w_gate is None else w_gate
    call = jax.ffi.ffi_call(TARGETS["PredictGateUp"], (
        jax.ShapeDtypeStruct((1, capacity), jnp.float32), jax.ShapeDtypeStruct((capacity,), jnp.int32),
        jax.ShapeDtypeStruct((1,), jnp.int32)))
    return call(x, w1, b1, w2, b2, gate, w_up, activation=ACTIVATION_CODES[activation], hidden_relu=int(hidden_relu),
                threshold=np.float32(threshold), gate_threshold=ffi_gate_threshold(gate_threshold),
                threads=threads or default_threads())


def _int4_operands(rows, d_model: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A projection's int4 rows as FFI operands; empty ones for a projection the predictor does not use."""
    if rows is None:
        return (jnp.zeros((0, d_model // 2), jnp.uint8), jnp.zeros((0, d_model // 32), jnp.float32),
                jnp.zeros((0,), jnp.float32))
    return rows.packed, rows.scales, rows.inv_norms


def int4_scores_cpu(x: Float[Array, "B D"], gate, up, activation: Activation, threads: int | None = None
                    ) -> Float[Array, "B F"]:
    """kernels_pallas.quant_predict's scores (gate, up: Int4Rows or None) for B tokens."""
    register()
    _check_f32(x=x)
    d_model = x.shape[-1]
    d_ff = (gate if gate is not None else up).packed.shape[0]
    call = jax.ffi.ffi_call(TARGETS["QuantScores"], jax.ShapeDtypeStruct((x.shape[0], d_ff), jnp.float32))
    return call(x, *_int4_operands(gate, d_model), *_int4_operands(up, d_model),
                activation=ACTIVATION_CODES[activation], threads=threads or default_threads())


def quant_sparse_ffn_cpu(
    x: Float[Array, "1 D"], gate_q, up_q, threshold: float, capacity: int, w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"], w_down: Float[Array, "F D"], activation: Activation, threads: int | None = None,
    gate_threshold: float | None = None,
) -> tuple[Float[Array, "1 D"], Int[Array, " 1"]]:
    """One token: int4 scores, the first `capacity` neurons above `threshold`, and their FFN output computed exactly
    (gate row, then the up row only where the activated gate passed, i.e. relu(g) > 0 and above `gate_threshold`
    when one is given, the down row only where the activation is not zero)."""
    register()
    _check_f32(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    d_model = x.shape[-1]
    gate = jnp.zeros((0, d_model), jnp.float32) if w_gate is None else w_gate
    call = jax.ffi.ffi_call(TARGETS["QuantSparseFfn"], (
        jax.ShapeDtypeStruct((1, d_model), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)))
    return call(x, *_int4_operands(gate_q, d_model), *_int4_operands(up_q, d_model), gate, w_up, w_down,
                activation=ACTIVATION_CODES[activation], threshold=np.float32(threshold),
                gate_threshold=ffi_gate_threshold(gate_threshold), capacity=int(capacity),
                threads=threads or default_threads())
