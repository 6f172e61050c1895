"""The disk tier: bundle files (round trip, staleness), O_DIRECT reads, the segmented neuron cache (hot region, LRU
order, read-ahead, budget), the naive loader, and decode through either tier equal to the in-RAM sparse engine."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.bench.disk_tier import DiskTierBenchConfig, decode
from sparse_lm.eval.generate import Generator
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer, init_cache
from sparse_lm.offload.disk import (
    DirectIOUnsupported,
    StaleBundle,
    direct_io_alignment,
    ensure_bundle,
    ffn_bundles,
    filesystem_of,
    read_layer,
    read_layout,
    read_neurons,
    read_ranges,
    write_bundle,
)
from sparse_lm.offload.disk_cache import (
    CachePlan,
    DiskTierConfig,
    NaiveLayerLoader,
    NeuronCache,
    plan_cache,
    plan_naive,
)
from sparse_lm.offload.disk_decode import fixed_region_model, install_disk_tier
from sparse_lm.predictors.quantized import Int4PredictorSet
from sparse_lm.sparse import install, remove

TINY3 = TINY.replace(n_layers=3)  # three layers: a naive budget can pin some layers and stream others
CAPACITIES = [48, 48, 48]


@pytest.fixture()
def disk_dir(tmp_path):
    """A folder where O_DIRECT works: tmp_path, or, where that is tmpfs, a scratch folder under the repo's runs/."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"\1" * 8192)
    try:
        direct_io_alignment(probe)
        yield tmp_path
        return
    except DirectIOUnsupported:
        pass
    runs = Path(__file__).resolve().parents[2] / "runs"
    runs.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=runs, prefix="test_disk_"))
    probe = folder / "probe"
    probe.write_bytes(b"\1" * 8192)
    try:
        direct_io_alignment(probe)
    except DirectIOUnsupported as e:
        shutil.rmtree(folder)
        pytest.skip(f"no filesystem here accepts O_DIRECT: {e}")
    yield folder
    shutil.rmtree(folder)


def _model(activation="drelu", seed=0):
    return Transformer(TINY3.replace(activation=activation), rngs=nnx.Rngs(seed))


def _bundle(disk_dir, model):
    path = disk_dir / "tiny.bundle"
    layout = write_bundle(path, model)
    return path, layout, direct_io_alignment(path)


@pytest.mark.parametrize("activation", ["drelu", "relu"])
def test_bundle_round_trip_is_exact(disk_dir, activation):
    model = _model(activation)
    path, layout, align = _bundle(disk_dir, model)
    assert read_layout(path) == layout
    assert path.stat().st_size == layout.file_bytes
    rows = 3 if activation == "drelu" else 2
    assert layout.neuron_bytes == rows * TINY.d_model * 4
    expected = list(ffn_bundles(model))
    ffn = model.blocks[1].ffn
    neurons = np.array([0, 1, 2, 37, 126, 127])  # both phases of a 1.5-block bundle, both ends of the layer
    got = read_neurons(path, layout, 1, neurons, align)
    np.testing.assert_array_equal(got.reshape(len(neurons), -1), expected[1][neurons])
    np.testing.assert_array_equal(got[:, -1], np.asarray(ffn.w_down[...])[neurons])  # the down row is last
    np.testing.assert_array_equal(got[:, -2], np.asarray(ffn.w_up[...]).T[neurons])
    for layer in range(TINY3.n_layers):
        np.testing.assert_array_equal(read_layer(path, layout, layer, align).reshape(TINY.d_ff, -1), expected[layer])


def test_direct_io_alignment_is_enforced(disk_dir):
    path, layout, align = _bundle(disk_dir, _model())
    assert align in (512, 1024, 2048, 4096)
    assert layout.window_bytes(align) % align == 0 and layout.window_bytes(align) >= layout.neuron_bytes
    views, _ = read_ranges(path, np.array([layout.data_offset]), np.array([align]), align)
    assert bytes(views[0]) == path.read_bytes()[layout.data_offset : layout.data_offset + align]
    with pytest.raises(ValueError, match="not aligned"):
        read_ranges(path, np.array([layout.data_offset + 4]), np.array([align]), align)
    with pytest.raises(ValueError, match="not aligned"):
        read_ranges(path, np.array([layout.data_offset]), np.array([align + 100]), align)


def test_tmpfs_refuses_direct_io_with_a_clear_message():
    shm = Path("/dev/shm")
    if not shm.is_dir() or filesystem_of(shm) != "tmpfs":
        pytest.skip("no tmpfs mount at /dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm))
    try:
        (folder / "b").write_bytes(b"\0" * 8192)
        with pytest.raises(DirectIOUnsupported, match="tmpfs"):
            direct_io_alignment(folder / "b")
    finally:
        shutil.rmtree(folder)


def test_a_stale_bundle_is_detected_and_rewritten(disk_dir):
    path = disk_dir / "tiny.bundle"
    first, status = ensure_bundle(path, _model(seed=0))
    assert status.startswith("written: ") and "no such bundle" in status
    assert ensure_bundle(path, _model(seed=0)) == (first, "reused")
    other, status = ensure_bundle(path, _model(seed=1))  # other weights, same shapes
    assert status.startswith("written: ") and "sha256" in status and other.sha256 != first.sha256
    assert read_layout(path).sha256 == other.sha256
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:-512]))  # truncated
    with pytest.raises(StaleBundle, match="bytes where the header implies"):
        read_layout(path)
    path.write_bytes(b"XXXXXXXX" + bytes(data[8:]))
    with pytest.raises(StaleBundle, match="bad magic"):
        read_layout(path)
    assert ensure_bundle(path, _model(seed=1))[1].startswith("written: ")
    assert not [p for p in disk_dir.iterdir() if p.name.endswith(".tmp")]  # the atomic write left no temporary


def _cache(path, layout, align, hot, lru_slots):
    hot_keys = np.array(sorted(layer * TINY3.d_ff + n for layer, n in hot), np.int64)
    plan = CachePlan(10**9, hot_keys, lru_slots, layout.neuron_bytes, layout.window_bytes(align))
    return NeuronCache.open(path, layout, align, plan, DiskTierConfig())


def test_lru_eviction_order_and_hot_region(disk_dir):
    model = _model()
    path, layout, align = _bundle(disk_dir, model)
    expected = list(ffn_bundles(model))
    with _cache(path, layout, align, hot=[(0, 5)], lru_slots=3) as cache:
        counts = []
        for neurons in ([1, 2], [1, 5], [3], [4], [2]):
            before = cache.stats()
            rows = cache.resolve(0, np.array(neurons))
            np.testing.assert_array_equal(rows.reshape(len(neurons), -1), expected[0][neurons])
            after = cache.stats()
            counts.append((after.hits - before.hits, after.misses - before.misses))
        # [1, 2]: both miss; [1, 5]: 1 from the LRU, 5 hot; [3]: miss (region full); [4]: miss, evicts 2 (the least
        # recently used); [2]: miss again, evicts 1
        assert counts == [(0, 2), (2, 0), (0, 1), (0, 1), (0, 1)]
        assert cache.lru_order() == [(0, 2), (0, 4), (0, 3)]
        assert (cache.where(0, 5), cache.where(0, 1), cache.where(0, 4)) == ("hot", None, "lru")
        stats = cache.stats()
        assert (stats.accesses, stats.hits, stats.misses, stats.reads) == (7, 2, 5, 5)
        assert stats.bytes_read == 5 * layout.window_bytes(align)
        # within a call hits are touched first, then misses placed, each in ascending order
        cache.resolve(0, np.array([3, 6]))
        assert cache.lru_order() == [(0, 6), (0, 3), (0, 2)]
        with pytest.raises(OSError, match="LRU slots"):
            cache.resolve(1, np.array([0, 1, 2, 3]))  # four misses cannot fit three slots
        cache.reset()  # the LRU region empties, the hot region stays
        assert cache.lru_order() == [] and cache.where(0, 5) == "hot" and cache.stats().accesses == 0


def test_read_ahead_lands_in_the_lru_region(disk_dir):
    model = _model()
    path, layout, align = _bundle(disk_dir, model)
    expected = list(ffn_bundles(model))
    with _cache(path, layout, align, hot=[(1, 8)], lru_slots=6) as cache:
        cache.prefetch(1, np.array([7, 8, 9, 10, 11]))  # 8 is hot; at most half the region (3) is read ahead
        stats = cache.stats()
        assert (stats.prefetch_reads, stats.reads, stats.accesses) == (3, 3, 0)
        rows = cache.resolve(1, np.array([7, 8, 11]))  # 11 was beyond the read-ahead limit
        np.testing.assert_array_equal(rows.reshape(3, -1), expected[1][[7, 8, 11]])
        stats = cache.stats()
        assert (stats.hits, stats.misses, stats.prefetch_used, stats.reads) == (2, 1, 1, 4)
    with _cache(path, layout, align, hot=[], lru_slots=2) as cache:
        cache.prefetch(0, np.array([10, 11]))  # one slot of two: 10 is read ahead
        # the second miss needs the slot 10's read-ahead may still be landing in: it waits for it, then evicts 10
        rows = cache.resolve(0, np.array([20, 21]))
        np.testing.assert_array_equal(rows.reshape(2, -1), expected[0][[20, 21]])
        assert cache.lru_order() == [(0, 21), (0, 20)] and cache.stats().prefetch_reads == 1


def test_budget_is_never_exceeded(disk_dir):
    path, layout, align = _bundle(disk_dir, _model())
    frequency = np.random.default_rng(0).integers(0, 1000, (TINY3.n_layers, TINY3.d_ff))
    for fraction in (0.4, 0.5, 0.8, 1.0):
        budget = int(fraction * layout.ffn_bytes)
        for lru_fraction in (0.0, 0.2, 0.5):
            plan = plan_cache(layout, align, frequency, budget, lru_fraction, min_lru_slots=48)
            assert plan.resident_bytes <= budget and plan.lru_slots >= 48
            assert budget - plan.resident_bytes < max(plan.neuron_bytes, plan.window_bytes) or \
                len(plan.hot_keys) == frequency.size
            # the hot neurons are the most frequent ones
            hot = np.zeros(frequency.size, bool)
            hot[plan.hot_keys] = True
            assert frequency.reshape(-1)[hot].min(initial=10**9) >= frequency.reshape(-1)[~hot].max(initial=-1)
            with NeuronCache.open(path, layout, align, plan, DiskTierConfig()) as cache:
                assert cache.stats().resident_bytes == plan.resident_bytes
        pinned = plan_naive(layout, budget)
        with NaiveLayerLoader.open(path, layout, align, pinned, DiskTierConfig()) as naive:
            assert naive.stats().resident_bytes <= budget
    with pytest.raises(ValueError, match="budget_fraction"):
        plan_cache(layout, align, frequency, 1000, 0.1, min_lru_slots=48)
    with pytest.raises(ValueError, match="budget_fraction"):
        plan_naive(layout, layout.layer_stride - 1)
    with pytest.raises(ValueError, match="disk.budget_fraction"):
        DiskTierConfig(budget_fraction=0.0)
    with pytest.raises(ValueError, match="budgets"):
        DiskTierBenchConfig(budgets=(0.5, 1.5))


def test_naive_loader_reads_unpinned_layers_whole(disk_dir):
    model = _model()
    path, layout, align = _bundle(disk_dir, model)
    expected = list(ffn_bundles(model))
    pinned = plan_naive(layout, int(2.5 * layout.layer_stride))
    assert pinned.tolist() == [1, 0, 0]
    with NaiveLayerLoader.open(path, layout, align, pinned, DiskTierConfig()) as naive:
        assert naive.pinned_layers == 1
        np.testing.assert_array_equal(naive.resolve(0, np.array([3, 9])).reshape(2, -1), expected[0][[3, 9]])
        np.testing.assert_array_equal(naive.resolve(1, np.array([0, 127])).reshape(2, -1), expected[1][[0, 127]])
        naive.resolve(1, np.array([5]))
        stats = naive.stats()
        assert (stats.accesses, stats.hits, stats.misses) == (5, 2, 3)
        assert stats.bytes_read == 2 * layout.layer_stride  # layer 1, whole, for each of its two calls


def _step_logits(model, tokens):
    """Logits of each token fed one at a time through a jitted KV-cache step ([T, V])."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, token, cache):
        return nnx.merge(graphdef, state)(token, cache)

    cache, out = init_cache(model.config, 1, 32), []
    for token in tokens:
        logits, cache = step(state, jnp.asarray([[token]], jnp.int32), cache)
        out.append(np.asarray(logits[0, -1]))
    return np.stack(out)


def test_decode_through_either_tier_equals_the_in_ram_engine(disk_dir):
    model = _model()
    predictors = Int4PredictorSet(model)
    predictors.thresholds[...] = jnp.array([0.0, -0.02, -0.01])
    path, layout, align = _bundle(disk_dir, model)
    budget = int(0.7 * layout.ffn_bytes)
    frequency = np.arange(TINY3.n_layers * TINY3.d_ff)[::-1].reshape(TINY3.n_layers, TINY3.d_ff)
    plan = plan_cache(layout, align, frequency, budget, 0.0, min_lru_slots=2 * max(CAPACITIES))
    tokens = [3, 141, 59, 26, 5, 35, 89, 79, 32, 38]
    with NeuronCache.open(path, layout, align, plan, DiskTierConfig()) as cache, \
            NaiveLayerLoader.open(path, layout, align, plan_naive(layout, budget), DiskTierConfig()) as naive:
        tier_models = []
        for tier, margin in ((cache, None), (cache, 0.0), (naive, None)):
            tier_model = fixed_region_model(model)
            install_disk_tier(tier_model, predictors, CAPACITIES, tier, margin)
            tier_models.append(tier_model)
        assert tier_models[0].blocks[0].ffn.w_up[...].size == 0  # FFN rows reachable only through the tier
        install(model, predictors, CAPACITIES, "ffi")
        reference = _step_logits(model, tokens)
        for tier_model, tier in zip(tier_models, (cache, cache, naive), strict=True):
            tier.reset()
            np.testing.assert_array_equal(_step_logits(tier_model, tokens), reference)  # bit for bit
            stats = tier.stats()
            assert stats.hits > 0 and stats.misses > 0 and stats.bytes_read > 0
        assert cache.stats().prefetch_reads > 0  # the last pass read ahead
        ram = decode(Generator(model, capacity=32), tokens[:4], 12)
        through_cache = decode(Generator(tier_models[1], capacity=32), tokens[:4], 12, cache)
        assert through_cache.tokens == ram.tokens and through_cache.stats.accesses > 0
        remove(model)
        with pytest.raises(ValueError, match="one token at a time"):
            tier_models[0](jnp.asarray([[1, 2]], jnp.int32))
    assert os.path.exists(path)


def test_the_benchmark_config_composes_and_a_missing_checkpoint_is_named(tmp_path):
    from hydra import compose, initialize_config_dir

    from experiments.common import to_config
    from experiments.schemas import register
    from sparse_lm.bench.disk_tier import RELUFY_COMMAND, run

    register()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = to_config(compose(config_name="bench_disk_tier", overrides=["budgets=[0.3]", "read_ahead_margin=null"]))
        with pytest.raises(Exception, match="disk.lru_fraction"):
            to_config(compose(config_name="bench_disk_tier", overrides=["disk.lru_fraction=2"]))
    assert isinstance(cfg, DiskTierBenchConfig) and cfg.model.path == "runs/train/relufy_smollm2_drelu"
    assert cfg.budgets == (0.3, 0.5) and cfg.read_ahead_margin is None  # the headline budget joins the sweep
    missing = DiskTierBenchConfig(model=cfg.model.__class__(source="checkpoint", path=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match=re.escape(RELUFY_COMMAND)):
        run(missing, tmp_path / "run")


def test_the_figure_draws_the_budget_sweep(tmp_path, make_figures):
    from sparse_lm.bench.disk_tier import BUDGET_COLUMNS
    from sparse_lm.results import load_result, write_result

    rows = []
    for budget, cache, naive in ((0.75, 30.0, 12.0), (0.25, 10.0, 5.0)):
        row = {c: 1.0 for c in BUDGET_COLUMNS} | {"budget_fraction": budget, "tokens_per_s_cache": cache,
                                                  "tokens_per_s_naive": naive, "speedup": cache / naive}
        rows.append([row[c] for c in BUDGET_COLUMNS])
    table = {"title": "Per budget (fraction of the FFN weights in RAM)", "columns": list(BUDGET_COLUMNS), "rows": rows}
    path = write_result("bench_disk_tier_test", {"model": "tiny"}, command="test", title="t", tables=[table],
                        results_dir=tmp_path)
    result = load_result(path)
    import figures_disk  # importable: the make_figures fixture put analysis/ on sys.path

    series = figures_disk.disk_tier_series(result)
    np.testing.assert_array_equal(series["budget_fraction"], [0.25, 0.75])  # sorted by budget
    np.testing.assert_array_equal(series["tokens_per_s_cache"], [10.0, 30.0])
    paths = make_figures.find_figure(result["name"])(result, tmp_path / "figures")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and paths[0].stat().st_size > 10_000
    kept = [i for i, c in enumerate(BUDGET_COLUMNS) if c != "speedup"]
    without_speedup = {"title": table["title"], "columns": [BUDGET_COLUMNS[i] for i in kept],
                       "rows": [[row[i] for i in kept] for row in rows]}
    broken = load_result(write_result("bench_disk_tier_broken", {"model": "tiny"}, command="test", title="t",
                                      tables=[without_speedup], results_dir=tmp_path))
    with pytest.raises(ValueError, match="speedup"):
        figures_disk.disk_tier_series(broken)


def test_decode_through_the_tier_applies_the_gate_thresholds_of_a_fatrelu_model(disk_dir):
    """ReGLU thresholded on its activated gate: the tier's FFN keeps only the predicted neurons with g > t, bit for
    bit the in-RAM engine's (itself equal to the gated dense model, tests/sparse), which the thresholds change."""
    model = Transformer(TINY3.replace(activation="reglu", ffn_thresholds=(0.6, 0.8, 0.7), ffn_threshold_on="gate"),
                        rngs=nnx.Rngs(0))
    plain = Transformer(TINY3.replace(activation="reglu"), rngs=nnx.Rngs(0))  # the same weights, no threshold
    predictors = Int4PredictorSet(model)
    predictors.thresholds[...] = jnp.array([0.0, -0.02, -0.01])
    path, layout, align = _bundle(disk_dir, model)
    plan = plan_cache(layout, align, np.zeros((TINY3.n_layers, TINY3.d_ff)), int(0.5 * layout.ffn_bytes), 0.0,
                      min_lru_slots=2 * max(CAPACITIES))
    tokens = [3, 141, 59, 26, 5, 35]
    with NeuronCache.open(path, layout, align, plan, DiskTierConfig()) as cache:
        tier_model = fixed_region_model(model)
        install_disk_tier(tier_model, predictors, CAPACITIES, cache)
        install(model, predictors, CAPACITIES, "ffi")
        reference = _step_logits(model, tokens)
        install(plain, predictors, CAPACITIES, "ffi")
        unthresholded = _step_logits(plain, tokens)
        np.testing.assert_array_equal(_step_logits(tier_model, tokens), reference)  # bit for bit
        remove(model)
        remove(plain)
    assert float(np.abs(reference - unthresholded).max()) > 1e-2
