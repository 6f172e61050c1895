"""sparse_lm.roofline.project: policies on machines where the answer is computable by hand."""

import dataclasses

import numpy as np
import pytest

from sparse_lm.models.config import Activation
from sparse_lm.roofline import (
    CostParams,
    HardwareProfile,
    ModelShape,
    NeuronSplit,
    Phase,
    Policy,
    Precision,
    gpu_ffn_capacity,
    ops,
    plan_memory,
    project_decode,
)

SHAPE = ModelShape("small", n_layers=4, d_model=64, d_ff=256, n_heads=4, n_kv_heads=2, vocab_size=128,
                   activation=Activation.relu)
FREE = CostParams(gpu_reserved_bytes=0.0, handoff_s=0.0, gpu_op_floor_s=0.0, cpu_op_floor_s=0.0)
CONTEXT = 8
GPU_BW, CPU_BW, PCIE_BW = 100e9, 10e9, 5e9


def machine(gpu_bytes: float) -> HardwareProfile:
    """Bandwidth-bound everywhere (huge FLOP/s), efficiencies 1: times are bytes / bandwidth."""
    return HardwareProfile("test", cpu_bandwidth=CPU_BW, cpu_flops=1e18, host_memory_bytes=1e12,
                           gpu_bandwidth=GPU_BW, gpu_flops=1e18, gpu_memory_bytes=gpu_bytes, pcie_bandwidth=PCIE_BW,
                           bandwidth_efficiency=1.0, compute_efficiency=1.0)


def layer_bytes(active: float = 1.0) -> float:
    return ops.total(ops.layer_ops(SHAPE, Precision.fp16, phase=Phase.decode, context=CONTEXT,
                                   active_fraction=active)).bytes


def layer_weights() -> float:
    return ops.weight_bytes(ops.layer_ops(SHAPE, Precision.fp16, phase=Phase.decode, context=CONTEXT))


KV = 2 * CONTEXT * SHAPE.kv_dim * 2
HEAD = ops.total(ops.head_ops(SHAPE, Precision.fp16)).bytes
EMBED = ops.total(ops.embedding_ops(SHAPE, Precision.fp16)).bytes
HIDDEN = SHAPE.d_model * 2


def project(policy, gpu_bytes, **kwargs):
    return project_decode(SHAPE, machine(gpu_bytes), policy, context=CONTEXT, params=FREE, **kwargs)


def test_all_fast_is_bytes_over_gpu_bandwidth():
    p = project(Policy.all_fast, 1e9)
    expected = (4 * layer_bytes() + HEAD + EMBED) / GPU_BW + SHAPE.vocab_size * 4 / PCIE_BW  # logits to the host
    assert p.seconds_per_token == pytest.approx(expected)
    assert p.plan.fits and p.cpu_busy_s == 0


def test_layer_split_equals_all_fast_when_everything_fits():
    fast, split = project(Policy.all_fast, 1e9), project(Policy.layer_split, 1e9)
    assert split.plan.gpu_layers == 4 and split.plan.head_on_gpu
    # llama.cpp looks the embedding up on the host and uploads the hidden state once.
    delta = EMBED / CPU_BW - EMBED / GPU_BW + HIDDEN / PCIE_BW
    assert split.seconds_per_token == pytest.approx(fast.seconds_per_token + delta)


def test_layer_split_by_hand():
    gpu_bytes = 2 * (layer_weights() + KV) + 1.0  # room for two whole layers, not for the head
    p = project(Policy.layer_split, gpu_bytes)
    assert (p.plan.gpu_layers, p.plan.head_on_gpu) == (2, False)
    # cpu (embedding, 2 layers) -> gpu (2 layers) -> cpu (head, sampling): two hand-offs of the hidden state
    expected = (EMBED + 2 * layer_bytes() + HEAD) / CPU_BW + 2 * layer_bytes() / GPU_BW + 2 * HIDDEN / PCIE_BW
    assert p.seconds_per_token == pytest.approx(expected)


def test_powerinfer_dense_everything_on_gpu_equals_layer_split():
    split = NeuronSplit.uniform(4, 256, 256)
    pi = project(Policy.powerinfer, 1e9, split=split, active_fraction=1.0)
    assert pi.seconds_per_token == pytest.approx(project(Policy.layer_split, 1e9).seconds_per_token)
    assert pi.gpu_firing_share == 1.0
    assert pi.cpu_busy_s == pytest.approx(EMBED / CPU_BW)  # only the embedding lookup runs on the host


def test_powerinfer_split_by_hand():
    params = CostParams(gpu_reserved_bytes=0.0, handoff_s=1e-6, gpu_op_floor_s=0.0, cpu_op_floor_s=0.0)
    active, share = 0.25, 0.75
    split = NeuronSplit((128,) * 4, (share,) * 4)
    p = project_decode(SHAPE, machine(1e9), Policy.powerinfer, context=CONTEXT, params=params, split=split,
                       active_fraction=active)
    ffn = [o for o in ops.ffn_ops(SHAPE, Precision.fp16, active_fraction=active) if o.component.value == "ffn"]
    neurons = sum(o.bytes for o in ffn)
    dense = layer_bytes(active) - neurons
    cold_ids = (1 - share) * active * 256 * 4
    cpu_side = (2 * HIDDEN + cold_ids) / PCIE_BW + 2e-6 + (1 - share) * neurons / CPU_BW
    per_layer = dense / GPU_BW + max(share * neurons / GPU_BW, cpu_side)
    expected = EMBED / CPU_BW + 4 * per_layer + HEAD / GPU_BW + (HIDDEN + 128 * 4) / PCIE_BW + 2e-6
    assert p.seconds_per_token == pytest.approx(expected)
    assert p.gpu_firing_share == pytest.approx(share) and p.sync_s == pytest.approx(4 * 2e-6 + 2e-6)


def test_powerinfer_capacity_and_oversized_split():
    neuron = 2 * 64 * 2  # a row of up and a column of down, f16
    head = ops.weight_bytes(ops.head_ops(SHAPE, Precision.fp16))
    small = 4 * (layer_weights() - 256 * neuron + KV) + head + 10.5 * neuron  # dense parts, head, 10.5 neurons
    assert gpu_ffn_capacity(SHAPE, machine(small), precision=Precision.fp16, kv_capacity=CONTEXT, params=FREE) == 10
    with pytest.raises(ValueError, match="only 10 fit"):
        project(Policy.powerinfer, small, split=NeuronSplit((11, 0, 0, 0), (0.5, 0, 0, 0)))


def test_flexgen_streams_what_does_not_fit():
    weights = layer_weights()
    gpu_bytes = 4 * KV + 3 * weights + 1.0  # one resident layer plus two staging buffers
    p = project(Policy.flexgen, gpu_bytes)
    assert p.plan.gpu_layers == 1
    streamed = (3 * weights + ops.weight_bytes(ops.head_ops(SHAPE, Precision.fp16))) / PCIE_BW
    assert p.pcie_busy_s == pytest.approx(streamed + (HIDDEN + SHAPE.vocab_size * 4) / PCIE_BW)
    # transfer-bound: each streamed layer costs its transfer (overlapped with compute)
    expected = (EMBED / CPU_BW + layer_bytes() / GPU_BW + 3 * weights / PCIE_BW
                + ops.weight_bytes(ops.head_ops(SHAPE, Precision.fp16)) / PCIE_BW
                + (HIDDEN + SHAPE.vocab_size * 4) / PCIE_BW)
    assert p.seconds_per_token == pytest.approx(expected)


def test_no_gpu_machine():
    cpu_only = HardwareProfile("cpu_only", cpu_bandwidth=CPU_BW, cpu_flops=1e18, host_memory_bytes=1e12,
                               bandwidth_efficiency=1.0, compute_efficiency=1.0)
    p = project_decode(SHAPE, cpu_only, Policy.all_fast, context=CONTEXT, params=FREE)
    assert p.seconds_per_token == pytest.approx((4 * layer_bytes() + HEAD + EMBED) / CPU_BW)
    with pytest.raises(ValueError, match="'cpu_only' has no GPU: policy layer_split"):
        project_decode(SHAPE, cpu_only, Policy.layer_split, context=CONTEXT)


def test_split_from_mask():
    mask = np.array([[True, False, False], [False, False, False]])
    freq = np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.3]])
    split = NeuronSplit.from_mask(mask, freq)
    assert split.fast_neurons == (1, 0) and split.fast_firing_share == (0.5, 0.0)
    with pytest.raises(ValueError, match="one of each per layer"):
        NeuronSplit((1, 2), (0.5,))


def test_plan_memory_host_side():
    plan = plan_memory(SHAPE, machine(1.0), Policy.layer_split, precision=Precision.fp16, kv_capacity=CONTEXT)
    assert plan.gpu_layers == 0 and not plan.head_on_gpu
    table = SHAPE.vocab_size * SHAPE.d_model * 2
    head = ops.weight_bytes(ops.head_ops(SHAPE, Precision.fp16))
    assert plan.host_bytes == pytest.approx(4 * (layer_weights() + KV) + table + head)


def test_default_int4_efficiency_is_the_fitted_constant():
    from sparse_lm.roofline.plan import GPU_INT4_BANDWIDTH_EFFICIENCY

    assert CostParams().gpu_int4_efficiency == GPU_INT4_BANDWIDTH_EFFICIENCY == 0.211


def test_int4_gpu_ops_run_at_the_int4_efficiency():
    """all_fast on the GPU: INT4 time = GPU bytes / (GPU bandwidth x efficiency) + the logits over PCIe (not
    scaled); FP16 ignores the efficiency."""
    efficiency = 0.25
    params = dataclasses.replace(FREE, gpu_int4_efficiency=efficiency)
    int4 = Precision.int4
    layer = ops.total(ops.layer_ops(SHAPE, int4, phase=Phase.decode, context=CONTEXT)).bytes
    gpu_bytes = 4 * layer + ops.total(ops.head_ops(SHAPE, int4)).bytes + ops.total(ops.embedding_ops(SHAPE, int4)).bytes
    p = project_decode(SHAPE, machine(1e9), Policy.all_fast, precision=int4, context=CONTEXT, params=params)
    assert p.gpu_busy_s == pytest.approx(gpu_bytes / (GPU_BW * efficiency))
    assert p.seconds_per_token == pytest.approx(gpu_bytes / (GPU_BW * efficiency) + SHAPE.vocab_size * 4 / PCIE_BW)
    full = project_decode(SHAPE, machine(1e9), Policy.all_fast, precision=int4, context=CONTEXT,
                          params=dataclasses.replace(FREE, gpu_int4_efficiency=1.0))
    assert full.gpu_busy_s == pytest.approx(gpu_bytes / GPU_BW)
    fp16 = project_decode(SHAPE, machine(1e9), Policy.all_fast, context=CONTEXT, params=params)
    assert fp16.seconds_per_token == pytest.approx(project(Policy.all_fast, 1e9).seconds_per_token)


def test_int4_efficiency_leaves_the_cpu_alone():
    """No layer fits the GPU: llama.cpp runs everything on the CPU, whatever the GPU's INT4 efficiency."""
    slow = project_decode(SHAPE, machine(1.0), Policy.layer_split, precision=Precision.int4, context=CONTEXT,
                          params=dataclasses.replace(FREE, gpu_int4_efficiency=0.1))
    fast = project_decode(SHAPE, machine(1.0), Policy.layer_split, precision=Precision.int4, context=CONTEXT,
                          params=dataclasses.replace(FREE, gpu_int4_efficiency=1.0))
    assert slow.plan.gpu_layers == 0 and slow.seconds_per_token == fast.seconds_per_token > 0


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_bad_int4_efficiency_is_named(value):
    with pytest.raises(ValueError, match="gpu_int4_efficiency"):
        CostParams(gpu_int4_efficiency=value)
