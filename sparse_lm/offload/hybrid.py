"""The hybrid device/host sparse FFN: PowerInfer's GPU-CPU neuron split as one JAX program.
Legend: B batch, L length, D d_model, F d_ff, Fs the neurons of one side, K capacity, N layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import Implementation, sparse_ffn
from kernels_pallas import cpu as cpu_kernels
from kernels_pallas.quant_predict import capped_mask
from sparse_lm.models.config import Activation, ThresholdTarget
from sparse_lm.offload.memory_tiers import (
    DEVICE,
    PINNED_HOST,
    host_masked_rows_ffn,
    host_rows_ffn,
    masked_rows_ffn,
    place,
    set_memory_kind,
    to_device,
    to_host,
)
from sparse_lm.predictors.module import PredictorSet
from sparse_lm.predictors.quantized import Int4PredictorSet
from sparse_lm.sparse.engine import active_mask, gate_threshold_of


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Attributes:
    implementation: the device side's sparse kernels. auto picks per lowering platform: the C++ twin on a CPU (XLA
      where it is not built), compiled Pallas on CUDA, so one step function runs here and lowers for a GPU; pallas
      (interpreted on a CPU) and xla likewise; ffi lowers for a CPU only. The host side always runs XLA's
      gather + dot (FFI calls inside compute_on run on a CPU but cannot lower for CUDA).
    offload_dense_weights: move each FFN's own dense matrices, which the hybrid FFN never reads, to pinned_host,
      so that device memory holds only the hot rows (on a GPU that is the point).
    """

    implementation: Implementation = Implementation.auto
    offload_dense_weights: bool = True

    def __post_init__(self):
        try:
            object.__setattr__(self, "implementation", Implementation(self.implementation))
        except ValueError:
            raise ValueError(f"hybrid.implementation must be one of {[i.value for i in Implementation]}, "
                             f"got {self.implementation!r}") from None


def check_hot_mask(hot_mask, n_layers: int, d_ff: int) -> Bool[np.ndarray, "N F"]:
    """The placement's hot mask ([N, F] bool, or one [F] mask per layer) as an [N, F] bool array; raises naming the
    layer or the shape that does not fit."""
    if isinstance(hot_mask, (list, tuple)):
        if len(hot_mask) != n_layers:
            raise ValueError(f"hot mask covers {len(hot_mask)} layers but the model has {n_layers}")
        for layer, layer_mask in enumerate(hot_mask):
            if np.shape(layer_mask) != (d_ff,):
                raise ValueError(f"hot mask of layer {layer} has shape {np.shape(layer_mask)}, expected ({d_ff},) "
                                 "(d_ff)")
        hot_mask = np.stack([np.asarray(m) for m in hot_mask])
    mask = np.asarray(hot_mask)
    if mask.shape != (n_layers, d_ff):
        raise ValueError(f"hot mask has shape {mask.shape}, expected [n_layers, d_ff] = ({n_layers}, {d_ff})")
    if mask.dtype != np.bool_:
        raise ValueError(f"hot mask must be bool (True: the neuron's rows in device memory), got {mask.dtype}")
    return mask


class NeuronIds(nnx.Variable):
    """Neuron ids of a layer: state, but never trained."""


class NeuronRows(nnx.Module):
    """Some neurons of one FFN: their ids in the layer (in device memory: they split the device-side mask) and their
    gate, up and down rows ([Fs, D] each) in `kind` memory."""

    def __init__(self, neurons: Int[np.ndarray, " Fs"], gate_rows, up_rows, down_rows, kind: str):
        self.neurons = NeuronIds(place(neurons.astype(np.int32), DEVICE))
        self.gate = None if gate_rows is None else nnx.Param(place(gate_rows[neurons], kind))
        self.up = nnx.Param(place(up_rows[neurons], kind))
        self.down = nnx.Param(place(down_rows[neurons], kind))

    @property
    def size(self) -> int:
        return int(self.neurons.shape[0])

    def weights(self) -> tuple[Array | None, Array, Array]:
        return None if self.gate is None else self.gate[...], self.up[...], self.down[...]


def compact(keep: Bool[Array, " F"], capacity: int) -> tuple[Int[Array, " K"], Int[Array, ""]]:
    """The first `capacity` kept positions, ascending and padded with 0, and their count (sparse.active_set on a
    mask)."""
    (rows,) = jnp.nonzero(keep, size=capacity, fill_value=0)
    return rows.astype(jnp.int32), jnp.minimum(jnp.sum(keep), capacity).astype(jnp.int32)


def device_rows_ffn(
    implementation: Implementation, x: Float[Array, "B D"], rows: Int[Array, " K"], count: Int[Array, ""],
    w_gate: Float[Array, "F D"] | None, w_up: Float[Array, "F D"], w_down: Float[Array, "F D"], activation: Activation,
    gate_threshold: float | None = None,
) -> Float[Array, "B D"]:
    """sparse_ffn with its kernels chosen per lowering platform (lax.platform_dependent), not by the default backend:
    the same traced step then runs on this CPU and lowers for CUDA."""
    args = (x, rows, count, w_gate, w_up, w_down)

    def kernels(which: Implementation, interpret: bool | None = None):
        return lambda *a: sparse_ffn(*a, activation, gate_threshold=gate_threshold, implementation=which,
                                     interpret=interpret)

    def cpp(x, rows, count, w_gate, w_up, w_down):
        # the C++ twin called directly: sparse_ffn(implementation=ffi) refuses to trace on a GPU host, and every
        # platform_dependent branch is traced wherever the step is
        hidden = cpu_kernels.sparse_gate_up_cpu(x, rows, count, w_gate, w_up, activation,
                                                gate_threshold=gate_threshold)
        return cpu_kernels.sparse_down_cpu(hidden, rows, count, w_down)

    if implementation is Implementation.xla:
        return kernels(Implementation.xla)(*args)
    if implementation is Implementation.pallas:
        branches = {"cpu": kernels(Implementation.pallas, True), "cuda": kernels(Implementation.pallas, False)}
    elif implementation is Implementation.ffi:
        branches = {"cpu": cpp}
    else:
        branches = {"cpu": cpp if cpu_kernels.available() else kernels(Implementation.xla),
                    "cuda": kernels(Implementation.pallas, False)}
    return jax.lax.platform_dependent(*args, **branches)


class HybridExecutor(nnx.Module):
    """One layer's hybrid FFN: its predictor, threshold and capacity (as the sparse engine's), hot rows in device
    memory and cold rows in pinned_host memory (either None when the placement leaves it no neuron), and the
    capacity of each side.

    The predictor (on the device) picks the active neurons exactly as the sparse engine does; the device computes
    the active hot rows with the sparse kernels, the host the active cold rows under compute_on('device_host') (x
    goes to the host, the partial output comes back), and the two partial outputs are summed on the device. Each
    side's capacity is static, so the decode step compiles once; longer inputs compute densely on each side with
    the same neurons.
    """

    def __init__(self, ffn, predictor: nnx.Module, threshold: float, capacity: int, hot_mask: Bool[np.ndarray, " F"],
                 hot_capacity: int, cold_capacity: int, implementation: Implementation):
        self.predictor = predictor
        self.threshold, self.capacity = float(threshold), int(capacity)
        self.hot_capacity, self.cold_capacity = int(hot_capacity), int(cold_capacity)
        self.implementation = Implementation(implementation)
        self.activation = Activation(ffn.activation)
        # numpy copies: a re-install may find the FFN's own matrices already in pinned_host memory
        gate_rows = None if ffn.w_gate is None else np.asarray(ffn.w_gate[...]).T
        up_rows, down_rows = np.asarray(ffn.w_up[...]).T, np.asarray(ffn.w_down[...])
        hot, cold = np.flatnonzero(hot_mask), np.flatnonzero(~hot_mask)
        self.hot = NeuronRows(hot, gate_rows, up_rows, down_rows, DEVICE) if hot.size else None
        self.cold = NeuronRows(cold, gate_rows, up_rows, down_rows, PINNED_HOST) if cold.size else None

    def __call__(self, ffn, x: Float[Array, "B L D"]) -> Float[Array, "B L D"]:
        mask = active_mask(self.predictor(x), self.threshold, self.capacity)  # the sparse engine's neurons
        if x.shape[:-1] == (1, 1):
            return self._one_token(x[0], mask[0, 0], gate_threshold_of(ffn))[None]
        return self._dense(x, mask, ffn.threshold, ffn.threshold_on)

    def _sides(self):
        return [(rows, capacity) for rows, capacity in ((self.hot, self.hot_capacity), (self.cold, self.cold_capacity))
                if rows is not None and capacity > 0]

    def _one_token(self, x: Float[Array, "1 D"], mask: Bool[Array, " F"], gate_threshold: float | None
                   ) -> Float[Array, "1 D"]:
        y = jnp.zeros_like(x)
        for rows, capacity in self._sides():
            indices, count = compact(mask[rows.neurons[...]], capacity)
            if rows is self.hot:
                y = y + device_rows_ffn(self.implementation, x, indices, count, *rows.weights(), self.activation,
                                        gate_threshold)
            else:
                keep = (jnp.arange(capacity) < count).astype(x.dtype)  # made on the device: see memory_tiers
                y = y + to_device(host_rows_ffn(*to_host((x, indices, keep)), *rows.weights(),
                                                activation=self.activation, gate_threshold=gate_threshold))
        return y

    def _dense(self, x: Float[Array, "B L D"], mask: Bool[Array, "B L F"], threshold: float | None,
               threshold_on: ThresholdTarget) -> Float[Array, "B L D"]:
        """Prefill / evaluation: each side dense over its rows, keeping the neurons a one-token step would."""
        y = jnp.zeros_like(x)
        for rows, capacity in self._sides():
            keep = capped_mask(mask[..., rows.neurons[...]], capacity).astype(x.dtype)
            if rows is self.hot:
                y = y + masked_rows_ffn(x, keep, *rows.weights(), self.activation, threshold, threshold_on)
            else:
                y = y + to_device(host_masked_rows_ffn(*to_host((x, keep)), *rows.weights(),
                                                       activation=self.activation, threshold=threshold,
                                                       threshold_on=threshold_on))
        return y


def _side_capacities(given: Sequence[int] | None, sizes: list[int], capacities: Sequence[int], side: str) -> list[int]:
    if given is None:  # never binding: each side fits every neuron the total capacity lets through
        return [min(c, s) for c, s in zip(capacities, sizes, strict=True)]
    if len(given) != len(sizes):
        raise ValueError(f"{len(given)} {side} capacities for a model of {len(sizes)} layers")
    for layer, (c, s) in enumerate(zip(given, sizes, strict=True)):
        if not 0 <= c <= s:
            raise ValueError(f"{side}_capacities[{layer}] = {c} outside [0, {s}] (the layer's {side} neurons)")
    return [int(c) for c in given]


def install_hybrid(
    model, predictors: PredictorSet | Int4PredictorSet, capacities: Sequence[int], hot_mask,
    config: HybridConfig = HybridConfig(), *, hot_capacities: Sequence[int] | None = None,
    cold_capacities: Sequence[int] | None = None,
) -> None:
    """Routes every FFN of `model` through a HybridExecutor (memory_tiers.remove_offload undoes it).

    Args:
      predictors, capacities: as for sparse.install; the hybrid FFN computes the same neurons.
      hot_mask: [N, F] bool (placement.Placement.mask), True for the neurons whose rows stay in device memory.
      hot_capacities, cold_capacities: per layer, the most active neurons each side computes per token (static).
        None: min(capacity, the side's neurons), which never drops a neuron the sparse engine keeps; smaller
        values drop the highest-numbered active neurons of that side.
    """
    config_model = model.config
    predictors.check_fits(config_model)
    if len(capacities) != config_model.n_layers:
        raise ValueError(f"{len(capacities)} capacities for a model of {config_model.n_layers} layers")
    mask = check_hot_mask(hot_mask, config_model.n_layers, config_model.d_ff)
    hot_sizes, cold_sizes = [int(m.sum()) for m in mask], [int((~m).sum()) for m in mask]
    hot_capacities = _side_capacities(hot_capacities, hot_sizes, capacities, "hot")
    cold_capacities = _side_capacities(cold_capacities, cold_sizes, capacities, "cold")
    thresholds = np.asarray(predictors.thresholds[...])
    for layer, block in enumerate(model.blocks):
        ffn = block.ffn
        ffn.executor = HybridExecutor(ffn, predictors.layers[layer], thresholds[layer], capacities[layer], mask[layer],
                                      hot_capacities[layer], cold_capacities[layer], config.implementation)
        if config.offload_dense_weights:
            for weight in (ffn.w_gate, ffn.w_up, ffn.w_down):
                set_memory_kind(weight, PINNED_HOST)
