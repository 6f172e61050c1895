"""Memory tiers of the offload structures: placement in device / pinned_host memory, host-side FFN math, a pure
decode step and its CUDA lowering check. Legend: B batch, L length, D d_model, F d_ff (or one tier's rows), K capacity,
V vocab.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.compute_on import compute_on
from jaxtyping import Array, Float, Int

from kernels_pallas.common import export_for_gpu
from sparse_lm.models.config import Activation, ThresholdTarget
from sparse_lm.models.ffn import activation_pair, gate_activation
from sparse_lm.models.transformer import KVCache, init_cache

DEVICE = "device"
PINNED_HOST = "pinned_host"


def place(array, memory_kind: str) -> jax.Array:
    """`array` committed to `memory_kind` memory of its device (the default device for host values)."""
    if isinstance(array, jax.Array):
        sharding = array.sharding.with_memory_kind(memory_kind)
    else:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=memory_kind)
    return jax.device_put(array, sharding)


def memory_kind(array: jax.Array) -> str:
    return array.sharding.memory_kind


def to_host(tree):
    """Inside a step: the arrays of `tree` moved to host memory (a memory space, so no device is named)."""
    return jax.device_put(tree, jax.memory.Space.Host)


def to_device(tree):
    return jax.device_put(tree, jax.memory.Space.Device)


def set_memory_kind(variable: nnx.Variable | None, kind: str) -> None:
    """Moves a variable's array to `kind` memory. (`variable[...] = x` would copy x into the old placement.)"""
    if variable is not None and memory_kind(variable[...]) != kind:
        variable.set_value(place(variable[...], kind))


# Host-safe math. Inside compute_on('device_host'), arrays read from pinned_host memory are typed host
# (float32<host>[...]) but arrays made there (jnp.zeros_like, the scalar jnp.where broadcasts, jnp.arange) are typed
# device, and an op mixing the two fails to trace (JAX 0.10.2: "memory_space of all inputs passed to `select_n` must
# be the same"). So the functions below mask by multiplying and make no array constants, and the host side never
# calls the sparse kernels (whose padding masks come from jnp.arange).


def keep_where(values: Float[Array, "... F"], keep) -> Float[Array, "... F"]:
    """values where `keep`, else 0, as a product: host-safe, and exact for finite values."""
    return values * keep.astype(values.dtype)


def thresholded_hidden(
    activation: Activation, gate: Float[Array, "... F"] | None, up: Float[Array, "... F"], threshold: float | None,
    threshold_on: ThresholdTarget,
) -> Float[Array, "... F"]:
    """models.ffn.thresholded_hidden, host-safe."""
    hidden = activation_pair(activation, gate, up)
    if threshold is None:
        return hidden
    tested = gate_activation(activation, gate) if threshold_on is ThresholdTarget.gate else hidden
    return keep_where(hidden, jnp.abs(tested) > threshold)


def rows_ffn(
    x: Float[Array, "B D"], rows: Int[Array, " K"], keep: Float[Array, " K"], w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"], w_down: Float[Array, "F D"], activation: Activation,
    gate_threshold: float | None = None,
) -> Float[Array, "B D"]:
    """The FFN of neurons `rows` (weights stored [F, D]) scaled by `keep` (1 for the active ones, 0 for padding),
    each zero unless its |sigma(gate)| exceeds `gate_threshold` (None: no threshold): the sparse_ffn reference's
    math, host-safe."""
    highest = jax.lax.Precision.HIGHEST

    def project(w):
        return jnp.einsum("bd,kd->bk", x, w[rows], precision=highest)

    hidden = thresholded_hidden(activation, None if w_gate is None else project(w_gate), project(w_up),
                                gate_threshold, ThresholdTarget.gate)
    return jnp.dot(keep_where(hidden, keep), w_down[rows], precision=highest)


def masked_rows_ffn(
    x: Float[Array, "... D"], keep: Float[Array, "... F"], w_gate: Float[Array, "F D"] | None,
    w_up: Float[Array, "F D"], w_down: Float[Array, "F D"], activation: Activation, threshold: float | None,
    threshold_on: ThresholdTarget = ThresholdTarget.hidden,
) -> Float[Array, "... D"]:
    """The dense FFN over rows stored [F, D], each token keeping the neurons `keep` marks (the sparse engine's
    prefill), the FFN's threshold applied where `threshold_on` says, host-safe."""

    def project(w):
        return jnp.einsum("...d,fd->...f", x, w)

    hidden = thresholded_hidden(activation, None if w_gate is None else project(w_gate), project(w_up), threshold,
                                threshold_on)
    return keep_where(hidden, keep) @ w_down


def dense_ffn(
    x: Float[Array, "... D"], w_gate: Float[Array, "D F"] | None, w_up: Float[Array, "D F"],
    w_down: Float[Array, "F D"], activation: Activation, threshold: float | None,
    threshold_on: ThresholdTarget = ThresholdTarget.hidden,
) -> Float[Array, "... D"]:
    """models.ffn.FFN's dense math on its own [D, F] / [F, D] matrices, host-safe."""
    gate = None if w_gate is None else x @ w_gate
    return thresholded_hidden(activation, gate, x @ w_up, threshold, threshold_on) @ w_down


def _on_host(fn: Callable, static: tuple[str, ...]) -> Callable:
    # Built once per function: a jit made per call would retrace (and, run eagerly, recompile) on every call.
    return compute_on("device_host")(jax.jit(fn, static_argnames=static))


host_rows_ffn = _on_host(rows_ffn, ("activation", "gate_threshold"))
host_masked_rows_ffn = _on_host(masked_rows_ffn, ("activation", "threshold", "threshold_on"))
host_dense_ffn = _on_host(dense_ffn, ("activation", "threshold", "threshold_on"))


def remove_offload(model) -> None:
    """Undoes any offload structure (hybrid, layer split, FlexGen) and the sparse engine: every FFN computes
    densely again from its own weights, moved back to device memory."""
    for block in model.blocks:
        ffn = block.ffn
        ffn.executor = None
        for weight in (ffn.w_gate, ffn.w_up, ffn.w_down):
            set_memory_kind(weight, DEVICE)


def decode_step(model, cache_capacity: int) -> tuple[Callable, tuple]:
    """A pure one-token step of `model` with whatever structure is installed on it, and example arguments:
    `step(leaves, token [1, 1], cache) -> (logits [1, 1, V], cache)`, the model's state passed as its flat leaves
    (as the Generator passes it), so pinned_host weights enter the step in pinned_host memory."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    def step(leaves, token: Int[Array, "1 1"], cache: KVCache):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(token, cache)

    # committed like the caches the step returns: with pinned_host arguments in the program, an uncommitted first
    # cache compiled a second program (measured, JAX 0.10.2)
    cache = jax.device_put(init_cache(model.config, 1, cache_capacity), jax.devices()[0])
    return step, (leaves, jnp.zeros((1, 1), jnp.int32), cache)


def bytes_by_memory_kind(model) -> dict[str, int]:
    """Bytes of the model's arrays (weights, predictors, executors' rows) in each memory kind."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(nnx.state(model)):
        if isinstance(leaf, jax.Array):
            out[memory_kind(leaf)] = out.get(memory_kind(leaf), 0) + leaf.nbytes
    return out


@dataclasses.dataclass(frozen=True)
class OffloadMarkers:
    """What of an offload structure survives in a lowered program (StableHLO text)."""

    host_computations: int  # calls XLA runs on the host (compute_on('device_host'))
    pinned_host_arguments: int  # arguments of the entry function placed in pinned_host memory
    to_host: int  # in-program transfers into pinned_host memory
    to_device: int  # in-program transfers into device memory


def offload_markers(mlir_text: str) -> OffloadMarkers:
    """Counts the markers in `mlir_text` (Exported.mlir_module() or Lowered.as_text()). Ops and nested calls inside a
    host computation carry the host attribute too: only calls made from outside one are counted."""
    host_calls = []  # (caller, callee)
    for function in re.split(r"(?m)^\s*func\.func ", mlir_text)[1:]:
        caller = re.match(r"\w+ @([\w.$-]+)", function).group(1)
        host_calls += [(caller, callee) for callee in
                       re.findall(r"call @([\w.$-]+)\(.*_xla_compute_type = \"host\"", function)]
    host_functions = {callee for _, callee in host_calls}
    main = re.search(r"func\.func public @main\((.*)", mlir_text)
    placements = re.findall(r"annotate_device_placement.*_xla_buffer_placement = \"(\w+)\"", mlir_text)
    return OffloadMarkers(
        host_computations=sum(caller not in host_functions for caller, _ in host_calls),
        pinned_host_arguments=0 if main is None else main.group(1).count('mhlo.memory_kind = "pinned_host"'),
        to_host=placements.count(PINNED_HOST),
        to_device=placements.count(DEVICE),
    )


def export_for_cuda(step: Callable, *args) -> jax.export.Exported:
    """`step(*args)` lowered for CUDA on any machine (see kernels_pallas.common.export_for_gpu); read what of the
    offload structure it kept with `offload_markers(exported.mlir_module())`."""
    return export_for_gpu(step, *args)
