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
Under INT4 (llama.cpp Q4_0) every GPU op of every policy runs at `params.gpu_int4_efficiency` of the GPU tier's
bandwidth (plan.GPU_INT4_BANDWIDTH_EFFICIENCY: the one fitted constant, and why).
Legend: L layers, F d_ff.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse_lm.roofline import ops as op_lib
from sparse_lm.roofline.hardware import HardwareProfile
from sparse_lm.roofline.ops import Component, Op, Phase
from sparse_lm.roofline.plan import (  # noqa: F401  (re-exported: the public API lives here too)
    GPU_INT4_BANDWIDTH_EFFICIENCY,
    CostParams,
    MemoryPlan,
    NeuronSplit,
    Policy,
    gpu_ffn_capacity,
    plan_memory,
)
from sparse_lm.roofline.roofline import Tier, cpu_tier, gpu_tier, pcie_bandwidth
from sparse_lm.roofline.shapes import ModelShape, Precision

_DEFAULT_PARAMS = CostParams()


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


def _gpu_tier(hardware: HardwareProfile, precision: Precision, params: CostParams) -> Tier:
    """The GPU tier, its bandwidth scaled by `params.gpu_int4_efficiency` under INT4 (Q4_0 kernels)."""
    tier = gpu_tier(hardware, params.gpu_op_floor_s)
    if precision is Precision.int4:
        tier = dataclasses.replace(tier, bandwidth=tier.bandwidth * params.gpu_int4_efficiency)
    return tier


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
                   predictor_params: float = 0.0, params: CostParams = _DEFAULT_PARAMS) -> Projection:
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
    gpu = _gpu_tier(hardware, precision, params) if hardware.has_gpu else None
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
            gpu_share = [o.scaled(share) for o in neurons]
            gpu_part = clock.run(gpu, gpu_share)
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
