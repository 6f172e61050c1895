"""Where a projection's weights live: the policies, their shared constants, PowerInfer's per-layer neuron split, and
the GPU memory plan of each policy (see sparse_lm.roofline.project for the policies' definitions).
Legend: L layers, F d_ff.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np
from jaxtyping import Bool, Float, Int

from sparse_lm.roofline import ops as op_lib
from sparse_lm.roofline.hardware import GIB, HardwareProfile
from sparse_lm.roofline.ops import Component, Phase
from sparse_lm.roofline.shapes import ModelShape, Precision


class Policy(str, enum.Enum):
    all_fast = "all_fast"
    layer_split = "layer_split"
    flexgen = "flexgen"
    powerinfer = "powerinfer"

    def __str__(self) -> str:
        return self.value


# llama.cpp's Q4_0 CUDA matrix-vector kernels (which PowerInfer, a llama.cpp fork, shares for its dense and its
# neuron-wise sparse operators) reach this fraction of the GPU tier's bandwidth (itself VENDOR_EFFICIENCY of the
# vendor sheet). Fitted, the cost model's only fitted constant: the value (3 significant figures) at which the
# projected PowerInfer INT4 mean rate on PC-High equals the paper's 13.20 tokens/s (validation case
# `int4_mean_rate_pc_high`, sparse_lm.roofline.validate.fit_gpu_int4_efficiency). Why a GPU Q4_0 efficiency and
# not a term of PowerInfer's alone: OPT-30B and Falcon-40B fit the 24 GB RTX 4090 whole in INT4, so llama.cpp runs
# them all-GPU; at full modelled bandwidth that is ~44 and ~32 tokens/s, above PowerInfer's reported INT4 peak
# (29.08), so the paper's speedups > 1 for every model need llama.cpp's own Q4_0 GPU kernels to be slower than
# the bandwidth roofline. Why Q4_0 is slow: 18-byte blocks (32 nibbles + an f16 scale) are not 16-byte aligned, so
# loads are not vectorised, and each weight is unpacked and scaled before its multiply-add.
GPU_INT4_BANDWIDTH_EFFICIENCY = 0.211


@dataclasses.dataclass(frozen=True)
class CostParams:
    """Constants every projection shares; each is an assumption stated here, except `gpu_int4_efficiency`,
    fitted once by the validation (see GPU_INT4_BANDWIDTH_EFFICIENCY).

    Attributes:
      gpu_reserved_bytes: GPU memory no weight may use: CUDA context (~0.3-0.5 GiB) plus scratch buffers.
      handoff_s: one synchronised hand-off of activations between CPU and GPU: a PCIe round trip (~10 us), a
        stream synchronisation and a CPU thread-pool wake-up (PowerInfer's T_sync, "tens of microseconds").
      gpu_op_floor_s: least time of a GPU op: a CUDA kernel launch (~5 us).
      cpu_op_floor_s: least time of a CPU op: a barrier across the engine's threads (~2 us for 8 threads).
      kv_element_bytes: bytes of a cached key or value element (llama.cpp's f16 cache).
      flexgen_overlap, flexgen_buffer_layers: see the module docstring.
      gpu_int4_efficiency: in (0, 1]: the share of the GPU tier's bandwidth reached in an INT4 (Q4_0)
        projection, by every policy and every GPU op of it (weights dominate; the KV and activation traffic of a
        decode step is small, so it is not treated apart). 1 leaves the plain roofline. CPU ops, PCIe and the
        other precisions are unaffected.
    """

    gpu_reserved_bytes: float = 1.0 * GIB
    handoff_s: float = 25e-6
    gpu_op_floor_s: float = 5e-6
    cpu_op_floor_s: float = 2e-6
    kv_element_bytes: int = 2
    flexgen_overlap: bool = True
    flexgen_buffer_layers: int = 2
    gpu_int4_efficiency: float = GPU_INT4_BANDWIDTH_EFFICIENCY

    def __post_init__(self):
        for key in ("gpu_reserved_bytes", "handoff_s", "gpu_op_floor_s", "cpu_op_floor_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"params.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.gpu_int4_efficiency <= 1:
            raise ValueError(f"params.gpu_int4_efficiency must be in (0, 1], got {self.gpu_int4_efficiency}")
        if self.kv_element_bytes not in (1, 2, 4):
            raise ValueError(f"params.kv_element_bytes must be 1, 2 or 4, got {self.kv_element_bytes}")
        if self.flexgen_buffer_layers < 1:
            raise ValueError(f"params.flexgen_buffer_layers must be >= 1, got {self.flexgen_buffer_layers}")


@dataclasses.dataclass(frozen=True)
class NeuronSplit:
    """Per layer: FFN neurons on the GPU, and the share of the layer's firings those neurons serve."""

    fast_neurons: tuple[int, ...]
    fast_firing_share: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "fast_neurons", tuple(int(n) for n in self.fast_neurons))
        object.__setattr__(self, "fast_firing_share", tuple(float(s) for s in self.fast_firing_share))
        if len(self.fast_neurons) != len(self.fast_firing_share):
            raise ValueError(f"split: {len(self.fast_neurons)} fast_neurons but {len(self.fast_firing_share)} "
                             "fast_firing_share values (need one of each per layer)")
        if any(n < 0 for n in self.fast_neurons) or any(not 0 <= s <= 1 for s in self.fast_firing_share):
            raise ValueError("split: fast_neurons must be >= 0 and fast_firing_share in [0, 1]")
        if any(n == 0 and s > 0 for n, s in zip(self.fast_neurons, self.fast_firing_share, strict=True)):
            raise ValueError("split: a layer with no fast neurons cannot serve a share of its firings")

    @property
    def layers(self) -> int:
        return len(self.fast_neurons)

    @property
    def total(self) -> int:
        return sum(self.fast_neurons)

    @classmethod
    def from_mask(cls, mask: Bool[np.ndarray, "L F"], frequencies: Float[np.ndarray, "L F"]) -> NeuronSplit:
        """From a placement mask (True: on the GPU) and per-neuron firing frequencies of the same shape."""
        mask, frequencies = np.asarray(mask, bool), np.asarray(frequencies, np.float64)
        if mask.shape != frequencies.shape or mask.ndim != 2:
            raise ValueError(f"mask {mask.shape} and frequencies {frequencies.shape} must both be [L, F]")
        if (frequencies < 0).any():
            raise ValueError("frequencies must be >= 0")
        totals = frequencies.sum(axis=1)
        fast = np.where(mask, frequencies, 0.0).sum(axis=1)
        share = np.divide(fast, totals, out=np.zeros_like(totals), where=totals > 0)
        return cls(tuple(mask.sum(axis=1)), tuple(np.minimum(share, 1.0)))

    @classmethod
    def uniform(cls, layers: int, d_ff: int, fast_neurons: Int[np.ndarray, " L"] | int) -> NeuronSplit:
        """No skew: every neuron fires equally often, so n fast neurons serve n / F of the firings."""
        counts = np.broadcast_to(np.asarray(fast_neurons, np.int64), (layers,))
        if (counts > d_ff).any():
            raise ValueError(f"split: more fast neurons than the {d_ff} of a layer")
        return cls(tuple(counts), tuple(counts / d_ff))

    @classmethod
    def none(cls, layers: int) -> NeuronSplit:
        return cls((0,) * layers, (0.0,) * layers)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Where weights live. `gpu_layers`: layers resident on the GPU (whole layers for the dense policies, their
    dense parts for powerinfer); `ffn_capacity_neurons`: FFN neurons that fit in what is left (powerinfer);
    `gpu_bytes`: what the layers, KV cache and head use (a powerinfer split's neurons come on top)."""

    gpu_layers: int
    head_on_gpu: bool
    ffn_capacity_neurons: int
    gpu_bytes: float
    gpu_budget_bytes: float
    host_bytes: float
    fits: bool


@dataclasses.dataclass(frozen=True)
class _Sizes:
    """Resident bytes of one layer's parts and of the tables."""

    dense: float  # attention projections + norms (+ biases)
    predictor: float
    ffn: float  # all F neurons
    kv: float  # the KV cache of one layer at the allocated context
    head: float
    embedding: float  # token (and position) tables: on the host, except under all_fast


def _sizes(shape: ModelShape, precision: Precision, rank: float, kv_capacity: int, params: CostParams) -> _Sizes:
    layer = op_lib.layer_ops(shape, precision, phase=Phase.decode, predictor_rank=rank)
    return _Sizes(
        dense=op_lib.weight_bytes(layer, Component.attention) + op_lib.weight_bytes(layer, Component.norm),
        predictor=op_lib.weight_bytes(layer, Component.predictor),
        ffn=op_lib.weight_bytes(layer, Component.ffn),
        kv=2.0 * kv_capacity * shape.kv_dim * params.kv_element_bytes,
        head=op_lib.weight_bytes(op_lib.head_ops(shape, precision)),
        embedding=(shape.vocab_size + shape.learned_positions) * shape.d_model * precision.bytes_per_weight,
    )


def plan_memory(shape: ModelShape, hardware: HardwareProfile, policy: Policy, *, precision: Precision,
                kv_capacity: int, predictor_params: float = 0.0, params: CostParams = CostParams()) -> MemoryPlan:
    """Decides what is resident on the GPU under `policy` (see the module docstring).

    Host memory holds every weight not on the GPU (powerinfer keeps the whole FFN there, as its engine maps the
    model file), the embedding table, and the KV cache of CPU layers.
    """
    policy, precision = Policy(policy), Precision(precision)
    rank = op_lib.predictor_rank(shape, predictor_params) if policy is Policy.powerinfer else 0.0
    size = _sizes(shape, precision, rank, kv_capacity, params)
    n_layers, total_neurons = shape.n_layers, shape.n_layers * shape.d_ff
    head_host = 0.0 if shape.tied_embeddings else size.head  # a tied head is the embedding table itself
    layer_bytes = size.dense + size.predictor + size.ffn  # weights of one layer
    everything = n_layers * (layer_bytes + size.kv) + size.embedding + head_host
    if not hardware.has_gpu:
        if policy is not Policy.all_fast:
            raise ValueError(f"hardware {hardware.name!r} has no GPU: policy {policy.value} needs one "
                             "(all_fast runs everything on the CPU)")
        return MemoryPlan(n_layers, False, 0, 0.0, 0.0, everything, everything <= hardware.host_memory_bytes)
    budget = hardware.gpu_memory_bytes - params.gpu_reserved_bytes
    if policy is Policy.all_fast:
        return MemoryPlan(n_layers, True, 0, everything, budget, 0.0, everything <= budget)
    if policy is Policy.flexgen:
        # KV of every layer stays on the GPU; streamed layers pass through staging buffers.
        room = budget - n_layers * size.kv
        if n_layers * layer_bytes + size.head > room:
            room -= params.flexgen_buffer_layers * layer_bytes
        layers = int(min(n_layers, max(0.0, room) // layer_bytes))
        staging = params.flexgen_buffer_layers * layer_bytes if layers < n_layers else 0.0
        used = n_layers * size.kv + layers * layer_bytes + staging
        resident = layers * layer_bytes
    else:
        per_layer = size.kv + (size.dense + size.predictor if policy is Policy.powerinfer else layer_bytes)
        layers = int(min(n_layers, max(0.0, budget) // per_layer))
        used = resident = layers * per_layer
        resident -= layers * size.kv
    head_on_gpu = layers == n_layers and budget - used >= size.head
    used += size.head if head_on_gpu else 0.0
    capacity = 0
    if policy is Policy.powerinfer and layers == n_layers:
        capacity = int(min(total_neurons, max(0.0, budget - used) // (size.ffn / shape.d_ff)))
    kv_on_gpu = n_layers if policy is Policy.flexgen else layers
    host = everything - resident - kv_on_gpu * size.kv - (head_host if head_on_gpu else 0.0)
    return MemoryPlan(layers, head_on_gpu, capacity, used, budget, host, host <= hardware.host_memory_bytes)


def gpu_ffn_capacity(shape: ModelShape, hardware: HardwareProfile, *, precision: Precision, kv_capacity: int,
                     predictor_params: float = 0.0, params: CostParams = CostParams()) -> int:
    """FFN neurons PowerInfer can put on the GPU once the dense parts and the LM head are there."""
    return plan_memory(shape, hardware, Policy.powerinfer, precision=precision, kv_capacity=kv_capacity,
                       predictor_params=predictor_params, params=params).ffn_capacity_neurons
