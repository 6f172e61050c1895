"""The hybrid device/host engine and the offload baselines on tiny models: equal to the all-device sparse engine /
the dense model, weights in the memory kinds they claim, one compilation for the decode, and a CUDA lowering that
keeps the host computations and transfers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels_pallas import masked_dense_ffn, sparse_ffn
from sparse_lm.models.config import Activation, ThresholdTarget
from sparse_lm.models.ffn import ffn_hidden
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer, init_cache
from sparse_lm.offload.baselines import LayerSplitConfig, install_flexgen, install_layer_split
from sparse_lm.offload.hybrid import HybridConfig, check_hot_mask, install_hybrid
from sparse_lm.offload.memory_tiers import (
    DEVICE,
    PINNED_HOST,
    OffloadMarkers,
    bytes_by_memory_kind,
    decode_step,
    export_for_cuda,
    host_dense_ffn,
    host_masked_rows_ffn,
    host_rows_ffn,
    memory_kind,
    offload_markers,
    place,
    remove_offload,
    to_device,
    to_host,
)
from sparse_lm.predictors import PredictorSet
from sparse_lm.sparse import install, remove

CAPACITY = 40  # these predictors pick 50-64 neurons per token: the cap binds on every token
ATOL = 1e-5


@functools.partial(jax.jit, static_argnums=0)
def _full(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, token, cache):
    return nnx.merge(graphdef, state)(token, cache)


def _full_logits(model, tokens):
    graphdef, state = nnx.split(model)
    return _full(graphdef, state, tokens)


def _decode_logits(model, tokens):
    """Logits of each position fed one token at a time (the one-token path); also how many programs the decode
    compiled."""
    graphdef, state = nnx.split(model)
    compiled_before = _step._cache_size()
    # committed, as the step's outputs are: with pinned_host arguments an uncommitted cache compiles a second program
    cache = jax.device_put(init_cache(model.config, 1, 16), jax.devices()[0])
    out = []
    for position in range(tokens.shape[1]):
        logits, cache = _step(graphdef, state, tokens[:, position : position + 1], cache)
        out.append(logits[:, 0])
    return jnp.stack(out, axis=1), _step._cache_size() - compiled_before


def _max_diff(a, b) -> float:
    return float(jnp.abs(a - b).max())


@pytest.mark.parametrize("activation", [Activation.swiglu, Activation.drelu, Activation.relu])  # smooth, ReLU, ungated
def test_host_math_equals_the_device_references(activation):
    """The host-safe FFN math, run under compute_on('device_host') on pinned_host weights, against the kernels'
    XLA references and the dense FFN on the device (ungated activations included)."""
    d_model, d_ff = 16, 24
    keys = jax.random.split(jax.random.key(7), 5)
    x = jax.random.normal(keys[0], (2, d_model))
    w_gate, w_up, w_down = (jax.random.normal(k, (d_ff, d_model)) * d_model**-0.5 for k in keys[1:4])
    w_gate = w_gate if activation.gated else None
    indices, count = jnp.array([3, 5, 11, 20, 0, 0], jnp.int32), jnp.asarray(4, jnp.int32)
    mask = jax.random.bernoulli(keys[4], 0.5, (2, d_ff))
    host = [None if w is None else place(w, PINNED_HOST) for w in (w_gate, w_up, w_down)]
    host_dense = [None if w is None else place(w.T if i < 2 else w, PINNED_HOST) for i, w in enumerate(host)]

    @jax.jit
    def on_host(x, indices, keep, mask, host, host_dense):
        rows = host_rows_ffn(*to_host((x, indices, keep)), *host, activation=activation)
        masked = host_masked_rows_ffn(*to_host((x, mask.astype(x.dtype))), *host, activation=activation,
                                      threshold=None)
        dense = host_dense_ffn(to_host(x), *host_dense, activation=activation, threshold=0.05)
        return to_device((rows, masked, dense))

    rows, masked, dense = on_host(x, indices, (jnp.arange(6) < count).astype(x.dtype), mask, host, host_dense)
    assert memory_kind(rows) == DEVICE
    np.testing.assert_allclose(rows, sparse_ffn(x, indices, count, w_gate, w_up, w_down, activation,
                                                implementation="xla"), atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(masked, masked_dense_ffn(x, mask, w_gate, w_up, w_down, activation), atol=ATOL,
                               rtol=ATOL)
    gate_t = None if w_gate is None else w_gate.T
    reference = ffn_hidden(x, gate_t, w_up.T, activation, threshold=0.05) @ w_down
    np.testing.assert_allclose(dense, reference, atol=ATOL, rtol=ATOL)
    assert float(jnp.abs(reference - ffn_hidden(x, gate_t, w_up.T, activation) @ w_down).max()) > 1e-4  # it cut


@pytest.fixture(scope="module")
def setup():
    """A tiny ReGLU model, predictors picking about half the neurons, tokens, and the references: the dense model's
    and the all-device sparse engine's logits (decode and full forward)."""
    model = Transformer(TINY.replace(activation="reglu"), rngs=nnx.Rngs(0))
    predictors = PredictorSet(model.config, [8, 8], rngs=nnx.Rngs(1))
    predictors.thresholds[...] = jnp.array([0.0, 0.1])
    tokens = jax.random.randint(jax.random.key(2), (1, 6), 0, TINY.vocab_size)
    dense = _full_logits(model, tokens)  # its decode matches to ~2e-6: the baselines' decode is checked against it
    install(model, predictors, [CAPACITY] * 2, "xla")
    sparse = {"full": _full_logits(model, tokens), "decode": _decode_logits(model, tokens)[0]}
    remove(model)
    assert _max_diff(sparse["full"], dense) > 1e-3  # the predictor changed something
    return model, predictors, tokens, dense, sparse


def _random_mask(share: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((TINY.n_layers, TINY.d_ff)) < share


def _assert_weights_placed(model, hot_mask):
    for layer, block in enumerate(model.blocks):
        executor = block.ffn.executor
        for rows, kind, expected in ((executor.hot, DEVICE, hot_mask[layer]), (executor.cold, PINNED_HOST,
                                                                               ~hot_mask[layer])):
            if not expected.any():
                assert rows is None
                continue
            np.testing.assert_array_equal(np.asarray(rows.neurons[...]), np.flatnonzero(expected))
            for weight in rows.weights():
                assert weight.shape == (expected.sum(), TINY.d_model) and memory_kind(weight) == kind
        # rows are the layer's own: W_up's column i is the up row of neuron i
        neuron = int(np.flatnonzero(~hot_mask[layer])[0]) if executor.cold is not None else 0
        side = executor.cold if executor.cold is not None else executor.hot
        np.testing.assert_array_equal(np.asarray(side.up[...])[0], np.asarray(block.ffn.w_up[...])[:, neuron])
        for weight in (block.ffn.w_gate, block.ffn.w_up, block.ffn.w_down):  # the unread dense copy, offloaded
            assert memory_kind(weight[...]) == PINNED_HOST


def _masks(case: str) -> np.ndarray:
    if case == "hot_and_cold":  # layer 0 all hot (no cold side), layer 1 all cold (no hot side)
        return np.stack([np.ones(TINY.d_ff, bool), np.zeros(TINY.d_ff, bool)])
    return _random_mask(0.3)


@pytest.mark.parametrize("case", ["random", "hot_and_cold", "no_cold_active", "random_xla"])
def test_hybrid_equals_the_sparse_engine(setup, case):
    model, predictors, tokens, dense, sparse = setup
    hot_mask = _masks(case)
    if case == "no_cold_active":
        # the predictor can never pick a cold neuron: the cold side exists but computes nothing, every token
        predictors = nnx.clone(predictors)
        for layer, predictor in enumerate(predictors.layers):
            predictor.b2[...] = jnp.where(jnp.asarray(hot_mask[layer]), predictor.b2[...], -1e4)
    config = HybridConfig(implementation="xla" if case == "random_xla" else "auto")
    install_hybrid(model, predictors, [CAPACITY] * 2, hot_mask, config)
    _assert_weights_placed(model, hot_mask)
    decode, compiled = _decode_logits(model, tokens)
    full = _full_logits(model, tokens) if case == "random" else None  # the prefill path: one mask suffices
    remove_offload(model)
    # active counts change every token, shapes never do (0: the program of an earlier case with this structure)
    assert compiled <= 1
    if case == "no_cold_active":
        install(model, predictors, [CAPACITY] * 2, "xla")
        reference = _decode_logits(model, tokens)[0]
        remove(model)
        assert _max_diff(reference, sparse["decode"]) > 1e-3  # the biased predictor differs
    else:
        reference = sparse["decode"]
    assert _max_diff(decode, reference) <= ATOL
    if full is not None:
        assert _max_diff(full, sparse["full"]) <= ATOL
    assert all(memory_kind(w[...]) == DEVICE for b in model.blocks for w in (b.ffn.w_gate, b.ffn.w_up, b.ffn.w_down))


def test_hybrid_side_capacity_keeps_the_first_active_neurons(setup):
    """One FFN under nnx.jit: a cold capacity of 2 keeps the hot side's active neurons and the first 2 active cold
    ones, exactly (the sparse engine would keep them all)."""
    model, predictors, _, _, _ = setup
    hot_mask = _random_mask(0.3)
    x = jax.random.normal(jax.random.key(5), (1, 1, TINY.d_model))
    ffn = model.blocks[0].ffn
    rows = (ffn.w_gate[...].T, ffn.w_up[...].T, ffn.w_down[...])
    predicted = np.asarray(predictors.layers[0](x))[0, 0] > float(predictors.thresholds[...][0])
    active = predicted & (np.cumsum(predicted) <= CAPACITY)
    cold_active = active & ~hot_mask[0]
    assert cold_active.sum() > 2 and (active & hot_mask[0]).any()
    kept = active & (hot_mask[0] | (np.cumsum(cold_active) <= 2))
    install_hybrid(model, predictors, [CAPACITY] * 2, hot_mask, cold_capacities=[2, 2])
    capped = nnx.jit(lambda ffn, x: ffn(x))(ffn, x)
    remove_offload(model)
    np.testing.assert_allclose(capped[0], masked_dense_ffn(x[0], jnp.asarray(kept)[None], *rows, ffn.activation),
                               atol=ATOL, rtol=ATOL)
    engine_neurons = masked_dense_ffn(x[0], jnp.asarray(active)[None], *rows, ffn.activation)
    assert _max_diff(capped[0], engine_neurons) > 1e-4


def test_ungated_hybrid_ffn_equals_the_sparse_engine():
    """ReLU (no W_gate): no gate rows on either side, the same output as the engine's FFN."""
    model = Transformer(TINY.replace(activation="relu"), rngs=nnx.Rngs(3))
    predictors = PredictorSet(model.config, [8, 8], rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(6), (1, 1, TINY.d_model))
    call = nnx.jit(lambda ffn, x: ffn(x))
    ffn = model.blocks[1].ffn
    install(model, predictors, [CAPACITY] * 2, "xla")
    engine = call(ffn, x)
    install_hybrid(model, predictors, [CAPACITY] * 2, _random_mask(0.5, seed=1))
    executor = ffn.executor
    hybrid = call(ffn, x)
    remove_offload(model)
    assert executor.hot.gate is None and executor.cold.gate is None
    assert _max_diff(hybrid, engine) <= ATOL
    assert float(jnp.abs(engine).max()) > 0.1


@pytest.mark.parametrize("structure", ["layer_split", "flexgen"])
def test_baselines_equal_the_dense_model(setup, structure):
    model, _, tokens, dense, _ = setup
    if structure == "layer_split":
        install_layer_split(model, LayerSplitConfig(fast_layers=1))
        expected = [DEVICE, PINNED_HOST]
    else:
        install_flexgen(model)
        expected = [PINNED_HOST, PINNED_HOST]
    kinds = [{memory_kind(w[...]) for w in (b.ffn.w_gate, b.ffn.w_up, b.ffn.w_down)} for b in model.blocks]
    decode, compiled = _decode_logits(model, tokens)
    # the executors have one path for any length; the full forward runs it on [1, 6, D] (the split's only)
    full = _full_logits(model, tokens) if structure == "layer_split" else decode
    remove_offload(model)
    assert kinds == [{kind} for kind in expected]
    assert compiled <= 1
    assert _max_diff(decode, dense) <= ATOL
    assert _max_diff(full, dense) <= ATOL


def _markers(model) -> tuple[OffloadMarkers, str]:
    step, args = decode_step(model, 16)
    text = export_for_cuda(step, *args).mlir_module()
    return offload_markers(text), text


def test_cuda_exports_keep_the_structure(setup):
    model, predictors, _, _, _ = setup
    n_layers = TINY.n_layers
    markers, _ = _markers(model)  # all weights on the fast tier: the dense model
    assert markers == OffloadMarkers(0, 0, 0, 0)

    install_hybrid(model, predictors, [CAPACITY] * 2, _random_mask(0.3))
    markers, text = _markers(model)
    remove_offload(model)
    # per layer: one host computation reading the cold gate, up and down rows; x, the cold indices and their
    # padding mask go to the host, the partial output comes back
    assert markers == OffloadMarkers(n_layers, 3 * n_layers, 3 * n_layers, n_layers)
    assert "__gpu$xla.gpu.triton" in text and "sparse_lm_" not in text  # hot side: Pallas; no CPU FFI call

    install_layer_split(model, LayerSplitConfig(fast_layers=1))
    markers, _ = _markers(model)
    remove_offload(model)
    assert markers == OffloadMarkers(1, 3, 1, 1)

    install_flexgen(model)
    markers, _ = _markers(model)
    remove_offload(model)
    assert markers == OffloadMarkers(0, 3 * n_layers, 0, 3 * n_layers)  # each matrix streamed in, per token


def test_offload_markers_count_only_outer_host_calls():
    text = """func.func public @main(%arg0: tensor<3xf32> {mhlo.memory_kind = "pinned_host"}, %arg1: tensor<3xf32>) {
    %1 = stablehlo.custom_call @annotate_device_placement(%0) {mhlo.frontend_attributes = {_xla_buffer_placement = "pinned_host"}}
    %2 = call @f(%1) {mhlo.frontend_attributes = {_xla_compute_type = "host"}} : (tensor<3xf32>) -> tensor<3xf32>
    %3 = stablehlo.custom_call @annotate_device_placement(%2) {mhlo.frontend_attributes = {_xla_buffer_placement = "device"}}
  }
  func.func private @f(%arg0: tensor<3xf32>) -> tensor<3xf32> {
    %0 = call @relu(%arg0) {mhlo.frontend_attributes = {_xla_compute_type = "host"}} : (tensor<3xf32>) -> tensor<3xf32>
  }
  func.func private @relu(%arg0: tensor<3xf32>) -> tensor<3xf32> {
  }"""  # noqa: E501 (the lines of a lowered module)
    assert offload_markers(text) == OffloadMarkers(1, 1, 1, 1)


def test_memory_accounting_and_remove(setup):
    model, predictors, tokens, dense, _ = setup
    before = bytes_by_memory_kind(model)
    assert set(before) == {DEVICE}
    hot_mask = _random_mask(0.3)
    install_hybrid(model, predictors, [CAPACITY] * 2, hot_mask)
    after = bytes_by_memory_kind(model)
    remove_offload(model)
    row_bytes = 3 * TINY.d_model * 4  # gate, up and down rows of one neuron, float32
    ffn_bytes = TINY.n_layers * TINY.d_ff * row_bytes
    assert after[PINNED_HOST] == ffn_bytes + int((~hot_mask).sum()) * row_bytes  # dense copy + cold rows
    predictor_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(predictors.layers)))  # no thresholds
    ids_bytes = TINY.n_layers * TINY.d_ff * 4
    assert after[DEVICE] == before[DEVICE] - ffn_bytes + int(hot_mask.sum()) * row_bytes + ids_bytes + predictor_bytes
    assert bytes_by_memory_kind(model) == before
    np.testing.assert_array_equal(_full_logits(model, tokens), dense)  # removed: the dense model again


def test_bad_placements_and_configs_fail_clearly(setup):
    model, predictors, _, _, _ = setup
    with pytest.raises(ValueError, match=r"hot mask has shape \(2, 64\), expected \[n_layers, d_ff\] = \(2, 128\)"):
        install_hybrid(model, predictors, [CAPACITY] * 2, np.ones((2, 64), bool))
    with pytest.raises(ValueError, match=r"hot mask of layer 1 has shape \(127,\), expected \(128,\)"):
        check_hot_mask([np.ones(128, bool), np.ones(127, bool)], 2, 128)
    with pytest.raises(ValueError, match="covers 3 layers but the model has 2"):
        check_hot_mask([np.ones(128, bool)] * 3, 2, 128)
    with pytest.raises(ValueError, match="hot mask must be bool"):
        check_hot_mask(np.ones((2, 128), np.int32), 2, 128)
    with pytest.raises(ValueError, match=r"cold_capacities\[1\] = 200 outside \[0, "):
        install_hybrid(model, predictors, [CAPACITY] * 2, _random_mask(0.3), cold_capacities=[8, 200])
    with pytest.raises(ValueError, match="hybrid.implementation must be one of"):
        HybridConfig(implementation="cuda")
    with pytest.raises(ValueError, match="layer_split.fast_layers must be an int >= 0"):
        LayerSplitConfig(fast_layers=-1)
    with pytest.raises(ValueError, match="layer_split.fast_layers = 3 exceeds the model's 2 layers"):
        install_layer_split(model, LayerSplitConfig(fast_layers=3))
    install(model, predictors, [CAPACITY] * 2, "xla")
    with pytest.raises(ValueError, match="layer 0's FFN has an executor"):
        install_flexgen(model)
    remove(model)
    assert all(block.ffn.executor is None for block in model.blocks)


def test_generator_compiles_one_decode_program_for_the_hybrid(setup):
    from sparse_lm.eval.generate import Generator

    model, predictors, tokens, _, _ = setup
    install_hybrid(model, predictors, [CAPACITY] * 2, _random_mask(0.3), HybridConfig(implementation="xla"))
    generator = Generator(model, capacity=32)
    result = generator.generate([int(t) for t in np.asarray(tokens)[0]], 6)
    remove_offload(model)
    assert len(result.tokens) == 6
    # keys and cache committed like the step's own outputs: the timed loop never compiles a second program
    assert generator._decode._cache_size() == 1


@pytest.mark.parametrize("activation", [Activation.swiglu, Activation.reglu, Activation.drelu])
def test_host_math_applies_gate_thresholds(activation):
    """The host-safe FFN math with a threshold on the activated gate (CATS, FATReLU) against the device references
    thresholded the same way; each differs from the unthresholded math."""
    d_model, d_ff, t = 16, 24, 0.4
    keys = jax.random.split(jax.random.key(8), 5)
    x = jax.random.normal(keys[0], (2, d_model))
    w_gate, w_up, w_down = (jax.random.normal(k, (d_ff, d_model)) * d_model**-0.5 for k in keys[1:4])
    indices, count = jnp.array([3, 5, 11, 20, 7, 0], jnp.int32), jnp.asarray(5, jnp.int32)
    mask = jax.random.bernoulli(keys[4], 0.7, (2, d_ff))
    host = [place(w, PINNED_HOST) for w in (w_gate, w_up, w_down)]
    host_dense = [place(w.T if i < 2 else w, PINNED_HOST) for i, w in enumerate(host)]
    gate_on = ThresholdTarget.gate

    @functools.partial(jax.jit, static_argnums=0)
    def on_host(threshold, x, indices, keep, mask, host, host_dense):
        rows = host_rows_ffn(*to_host((x, indices, keep)), *host, activation=activation, gate_threshold=threshold)
        masked = host_masked_rows_ffn(*to_host((x, mask.astype(x.dtype))), *host, activation=activation,
                                      threshold=threshold, threshold_on=gate_on)
        dense = host_dense_ffn(to_host(x), *host_dense, activation=activation, threshold=threshold,
                               threshold_on=gate_on)
        return to_device((rows, masked, dense))

    keep = (jnp.arange(6) < count).astype(x.dtype)
    rows, masked, dense = on_host(t, x, indices, keep, mask, host, host_dense)
    plain = on_host(None, x, indices, keep, mask, host, host_dense)
    np.testing.assert_allclose(rows, sparse_ffn(x, indices, count, w_gate, w_up, w_down, activation,
                                                gate_threshold=t, implementation="xla"), atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(masked, masked_dense_ffn(x, mask, w_gate, w_up, w_down, activation, gate_threshold=t),
                               atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(dense, ffn_hidden(x, w_gate.T, w_up.T, activation, t, gate_on) @ w_down, atol=ATOL,
                               rtol=ATOL)
    for thresholded, unthresholded in zip((rows, masked, dense), plain, strict=True):
        assert _max_diff(thresholded, unthresholded) > 1e-3  # the threshold cut


def test_hybrid_and_baselines_apply_the_gate_thresholds_of_a_fatrelu_model():
    """ReGLU thresholded on its activated gate: the hybrid (decode, both sides, and prefill) equals the all-device
    sparse engine, which equals the predictor-gated dense model (tests/sparse); the baselines equal the dense model."""
    config = TINY.replace(activation="reglu", ffn_thresholds=(0.6, 0.8), ffn_threshold_on="gate")
    model = Transformer(config, rngs=nnx.Rngs(0))
    plain = Transformer(TINY.replace(activation="reglu"), rngs=nnx.Rngs(0))  # the same weights, no threshold
    predictors = PredictorSet(model.config, [8, 8], rngs=nnx.Rngs(1))
    predictors.thresholds[...] = jnp.array([0.0, 0.1])
    tokens = jax.random.randint(jax.random.key(9), (1, 6), 0, TINY.vocab_size)
    dense = _full_logits(model, tokens)
    assert _max_diff(dense, _full_logits(plain, tokens)) > 1e-2  # the thresholds matter
    install(model, predictors, [CAPACITY] * 2, "xla")
    engine = {"full": _full_logits(model, tokens), "decode": _decode_logits(model, tokens)[0]}
    remove(model)
    install(plain, predictors, [CAPACITY] * 2, "xla")
    assert _max_diff(engine["decode"], _decode_logits(plain, tokens)[0]) > 1e-2
    remove(plain)
    install_hybrid(model, predictors, [CAPACITY] * 2, _random_mask(0.3))  # auto: the C++ twin on the device side
    hybrid = {"full": _full_logits(model, tokens), "decode": _decode_logits(model, tokens)[0]}
    remove_offload(model)
    for path in ("full", "decode"):
        assert _max_diff(hybrid[path], engine[path]) <= ATOL, path
    for install_baseline in (functools.partial(install_layer_split, config=LayerSplitConfig(fast_layers=1)),
                             install_flexgen):
        install_baseline(model)
        decode, _ = _decode_logits(model, tokens)
        full = _full_logits(model, tokens)
        remove_offload(model)
        assert _max_diff(decode, dense) <= ATOL and _max_diff(full, dense) <= ATOL
