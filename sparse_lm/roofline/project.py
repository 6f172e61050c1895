"""Decode-time projection of a model on a machine under an offload policy: where every weight lives, then the
roofline time of every op on its tier, the hand-offs between tiers and the overlap of concurrent work.

Policies (one per baseline of PowerInfer's evaluation):
  all_fast: everything on the GPU (on the CPU for a machine without one); `fits` says whether it does.
  layer_split (llama.cpp -ngl): as many whole dense layers as fit on the GPU (the last ones, as llama.cpp
    offloads), the rest dense on the CPU; the LM head on the GPU only once every layer is there.
  flexgen: layers that do not fit are streamed host -> GPU over PCIe every token into `flexgen_buffer_layers`
    staging buffers; with `flexgen_overlap` a layer's transfer overlaps the previous layer's compute, so a
    streamed layer costs max(transfer, compute), else transfer + compute.
  powerinfer: the dense parts (attention, norms, predictor, KV) of each layer on the GPU first, then the LM
    head, then FFN neurons in the space left (the released engine's order); a split says per layer how many
    neurons are on the GPU and what share of the layer's firings they serve. Both tiers compute only active
    neurons, concurrently; a layer with neurons on the CPU pays two hand-offs (the FFN input and the active
    indices to the CPU, its partial output back). Layers whose dense part did not fit run wholly on the CPU.
Legend: L layers, F d_ff.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Bool, Float, Int

from sparse_lm.roofline import ops as op_lib
from sparse_lm.roofline.hardware import GIB, HardwareProfile
from sparse_lm.roofline.ops import Component, Op, Phase
from sparse_lm.roofline.roofline import Tier, cpu_tier, gpu_tier, pcie_bandwidth
from sparse_lm.roofline.shapes import ModelShape, Precision


class Policy(str, enum.Enum):
    all_fast = "all_fast"
    layer_split = "layer_split"
    flexgen = "flexgen"
    powerinfer = "powerinfer"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class CostParams:
    """Constants every projection shares (none is fitted to a result; each is an assumption stated here).

    Attributes:
      gpu_reserved_bytes: GPU memory no weight may use: CUDA context (~0.3-0.5 GiB) plus scratch buffers.
      handoff_s: one synchronised hand-off of activations between CPU and GPU: a PCIe round trip (~10 us), a
        stream synchronisation and a CPU thread-pool wake-up (PowerInfer's T_sync, "tens of microseconds").
      gpu_op_floor_s: least time of a GPU op: a CUDA kernel launch (~5 us).
      cpu_op_floor_s: least time of a CPU op: a barrier across the engine's threads (~2 us for 8 threads).
      kv_element_bytes: bytes of a cached key or value element (llama.cpp's f16 cache).
      flexgen_overlap, flexgen_buffer_layers: see the module docstring.
    """

    gpu_reserved_bytes: float = 1.0 * GIB
    handoff_s: float = 25e-6
    gpu_op_floor_s: float = 5e-6
    cpu_op_floor_s: float = 2e-6
    kv_element_bytes: int = 2
    flexgen_overlap: bool = True
    flexgen_buffer_layers: int = 2

    def __post_init__(self):
        for key in ("gpu_reserved_bytes", "handoff_s", "gpu_op_floor_s", "cpu_op_floor_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"params.{key} must be >= 0, got {getattr(self, key)}")
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
class Projection:
    """Per-token decode time and where it goes. `*_busy_s` are each resource's busy time (concurrent work
    overlaps, so they may sum to more than `seconds_per_token`); `sync_s` is the summed hand-off latency."""

    policy: Policy
    model: str
    hardware: str
    precision: Precision
    context: int
    seconds_per_token: float
    gpu_busy_s: float
    cpu_busy_s: float
    pcie_busy_s: float
    sync_s: float
    plan: MemoryPlan
    gpu_ffn_neurons: int = 0
    gpu_firing_share: float = 0.0  # share of all FFN firings served on the GPU
    active_fraction: float = 1.0  # mean FFN active fraction computed (1 for the dense policies)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "plan"}
        out |= {"policy": self.policy.value, "precision": self.precision.value, "tokens_per_s": self.tokens_per_s}
        return out | {f"plan_{k}": v for k, v in dataclasses.asdict(self.plan).items()}


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


class _Clock:
    """Accumulates the critical path and each resource's busy time."""

    def __init__(self, gpu: Tier | None, cpu: Tier, pcie: float | None, handoff_s: float):
        self.gpu_tier, self.cpu_tier, self.pcie_bandwidth, self.handoff_s = gpu, cpu, pcie, handoff_s
        self.wall = self.gpu = self.cpu = self.pcie = self.sync = 0.0

    def run(self, tier: Tier, ops: list[Op]) -> float:
        """Busy time of `ops` on `tier` (not yet on the critical path: the caller decides what overlaps)."""
        seconds = tier.total_time(ops)
        if tier is self.gpu_tier:
            self.gpu += seconds
        else:
            self.cpu += seconds
        return seconds

    def transfer(self, n_bytes: float) -> float:
        seconds = n_bytes / self.pcie_bandwidth
        self.pcie += seconds
        return seconds

    def handoff(self, n_bytes: float) -> float:
        """One synchronised hand-off of `n_bytes` across PCIe."""
        self.sync += self.handoff_s
        return self.transfer(n_bytes) + self.handoff_s


def _per_layer(values: float | Sequence[float], layers: int, name: str) -> np.ndarray:
    array = np.asarray(values, np.float64)
    if array.ndim == 0:
        array = np.full(layers, float(array))
    if array.shape != (layers,):
        raise ValueError(f"{name} needs one value or {layers} (one per layer), got shape {array.shape}")
    if ((array < 0) | (array > 1)).any():
        raise ValueError(f"{name} must be in [0, 1], got {array.min()} .. {array.max()}")
    return array


def project_decode(shape: ModelShape, hardware: HardwareProfile, policy: Policy, *,
                   precision: Precision = Precision.fp16, context: int = 128, kv_capacity: int | None = None,
                   active_fraction: float | Sequence[float] = 1.0, split: NeuronSplit | None = None,
                   predictor_params: float = 0.0, params: CostParams = CostParams()) -> Projection:
    """Time per generated token (batch 1) of `shape` on `hardware` under `policy`.

    Args:
      context: tokens attended to (KV length) by the projected step; the mean over a generation is a good choice.
      kv_capacity: tokens of KV cache allocated (default `context`), counted against GPU memory.
      active_fraction: one value or [L]: share of FFN neurons that fire (powerinfer only; the others are dense).
      split: powerinfer's neurons on the GPU per layer (default: none); must fit `gpu_ffn_capacity`.
      predictor_params: weights of all predictors (powerinfer only; 0: an oracle that costs nothing).

    Raises:
      ValueError: naming the input at fault (no GPU for a GPU policy, a split that does not fit, ...).
    """
    policy, precision = Policy(policy), Precision(precision)
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    kv_capacity = context if kv_capacity is None else kv_capacity
    n_layers, powerinfer = shape.n_layers, policy is Policy.powerinfer
    plan = plan_memory(shape, hardware, policy, precision=precision, kv_capacity=kv_capacity,
                       predictor_params=predictor_params, params=params)
    rank = op_lib.predictor_rank(shape, predictor_params) if powerinfer else 0.0
    fractions = _per_layer(active_fraction, n_layers, "active_fraction") if powerinfer else np.ones(n_layers)
    if powerinfer:
        split = split or NeuronSplit.none(n_layers)
        _check_split(split, shape, plan)
    cpu = cpu_tier(hardware, params.cpu_op_floor_s)
    gpu = gpu_tier(hardware, params.gpu_op_floor_s) if hardware.has_gpu else None
    fast = gpu or cpu
    clock = _Clock(gpu, cpu, pcie_bandwidth(hardware) if gpu else None, params.handoff_s)
    attention = op_lib.attention_ops(shape, precision, phase=Phase.decode, context=context,
                                     kv_element_bytes=params.kv_element_bytes)
    predictor = op_lib.predictor_ops(shape, precision, rank)

    # Stages in order (embedding, layers, head, sampling on the host), each on one tier; a change of tier
    # between stages is a hand-off of the hidden state (of the logits before sampling).
    stages = [fast if policy is Policy.all_fast else cpu]
    clock.wall += clock.run(stages[0], op_lib.embedding_ops(shape, precision))
    first_gpu_layer = n_layers - plan.gpu_layers if policy is Policy.layer_split else 0  # llama.cpp: the last
    gpu_neurons, gpu_firings = 0, 0.0
    for layer in range(n_layers):
        ffn = op_lib.ffn_ops(shape, precision, active_fraction=float(fractions[layer]))
        neurons = [o for o in ffn if o.component is Component.ffn]
        dense = attention + predictor + [o for o in ffn if o.component is Component.norm]
        if policy is Policy.all_fast:
            tier = fast
        elif policy is Policy.layer_split:
            tier = gpu if layer >= first_gpu_layer else cpu
        elif policy is Policy.flexgen or layer < plan.gpu_layers:
            tier = gpu
        else:  # powerinfer, dense part not on the GPU: the whole layer runs on the CPU
            tier = cpu
        stages.append(tier)
        if policy is Policy.flexgen and layer >= plan.gpu_layers:
            compute = clock.run(gpu, dense + neurons)
            transfer = clock.transfer(op_lib.weight_bytes(dense + neurons))
            clock.wall += max(transfer, compute) if params.flexgen_overlap else transfer + compute
        elif not powerinfer or tier is cpu:
            clock.wall += clock.run(tier, dense + neurons)
        else:
            share = split.fast_firing_share[layer]
            gpu_neurons += split.fast_neurons[layer]
            gpu_firings += share * fractions[layer]
            clock.wall += clock.run(gpu, dense)
            gpu_part = clock.run(gpu, [o.scaled(share) for o in neurons])
            cpu_part = 0.0
            if share < 1 and fractions[layer] > 0:
                hidden = shape.d_model * precision.activation_bytes
                cold_ids = (1 - share) * fractions[layer] * shape.d_ff * 4  # int32 indices of active cold neurons
                cpu_part = (clock.handoff(hidden + cold_ids) + clock.run(cpu, [o.scaled(1 - share) for o in neurons])
                            + clock.handoff(hidden))
            clock.wall += max(gpu_part, cpu_part)  # the two tiers compute their neurons concurrently
    head = op_lib.head_ops(shape, precision)
    head_tier = fast if policy is Policy.all_fast else gpu if plan.head_on_gpu or policy is Policy.flexgen else cpu
    stages.append(head_tier)
    compute = clock.run(head_tier, head)
    if policy is Policy.flexgen and not plan.head_on_gpu:
        transfer = clock.transfer(op_lib.weight_bytes(head))
        compute = max(transfer, compute) if params.flexgen_overlap else transfer + compute
    clock.wall += compute
    stages.append(cpu)
    for index in range(1, len(stages)):
        if stages[index] is not stages[index - 1]:
            logits = index == len(stages) - 1
            clock.wall += clock.handoff(shape.vocab_size * 4 if logits else shape.d_model * precision.activation_bytes)

    if powerinfer:
        total = float(fractions.sum())
        share = gpu_firings / total if total else 0.0
    else:
        gpu_neurons = (n_layers if policy is Policy.all_fast and gpu else plan.gpu_layers if gpu else 0) * shape.d_ff
        share = gpu_neurons / (n_layers * shape.d_ff)
    return Projection(
        policy=policy, model=shape.name, hardware=hardware.name, precision=precision, context=context,
        seconds_per_token=clock.wall, gpu_busy_s=clock.gpu, cpu_busy_s=clock.cpu, pcie_busy_s=clock.pcie,
        sync_s=clock.sync, plan=plan, gpu_ffn_neurons=int(gpu_neurons), gpu_firing_share=float(share),
        active_fraction=float(fractions.mean()),
    )


def _check_split(split: NeuronSplit, shape: ModelShape, plan: MemoryPlan) -> None:
    if split.layers != shape.n_layers:
        raise ValueError(f"split has {split.layers} layers, {shape.name} has {shape.n_layers}")
    if max(split.fast_neurons, default=0) > shape.d_ff:
        raise ValueError(f"split puts more than the {shape.d_ff} neurons of a layer on the GPU")
    if split.total > plan.ffn_capacity_neurons:
        raise ValueError(f"split puts {split.total} FFN neurons on the GPU but only {plan.ffn_capacity_neurons} "
                         f"fit there after the dense parts (gpu_ffn_capacity)")
    stranded = [layer for layer in range(plan.gpu_layers, shape.n_layers) if split.fast_neurons[layer]]
    if stranded:
        raise ValueError(f"split puts neurons on the GPU for layers {stranded[:5]}... whose dense part is on the CPU")
