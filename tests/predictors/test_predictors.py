"""Predictors: calibration and metrics by hand, module shapes and checks, dataset shards, training on a
learnable problem, storage, FFN gating, and the task end to end on a tiny model."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.models.capture import capture_forward, set_capture
from sparse_lm.models.ffn import CapturePoint
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer
from sparse_lm.predictors import (
    MetricsAccumulator,
    PredictorSet,
    PredictorTrainConfig,
    attach,
    calibrate_threshold,
    load_predictors,
    save_predictors,
)
from sparse_lm.predictors.dataset import DatasetError, calibration_split, collect, layer_batches, open_dataset
from sparse_lm.predictors.metrics import LayerMetrics, budget_threshold
from sparse_lm.predictors.module import LowRankPredictor, ffn_params, predictor_params
from sparse_lm.predictors.sizing import choose_ranks, uniform_rank_of_equal_size
from sparse_lm.predictors.train import calibrate, measure, train_layer
from sparse_lm.profiling.firing import FiringConfig

ROOT = Path(__file__).resolve().parents[2]


def test_threshold_reaches_the_target_recall_exactly():
    logits = np.array([[0.1, 0.5, -1.0], [0.9, 2.0, 3.0]])
    fired = np.array([[True, True, False], [True, True, False]])
    threshold = calibrate_threshold(logits, fired, 0.75)  # keep the 3 largest positive logits: 0.5, 0.9, 2.0
    assert 0.1 < threshold < 0.5
    predicted = logits > threshold
    assert (predicted & fired).sum() / fired.sum() == 0.75
    assert calibrate_threshold(logits, fired, 1.0) < 0.1
    assert calibrate_threshold(logits, np.zeros_like(fired), 0.9) == math.inf
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="target recall"):
            calibrate_threshold(logits, fired, bad)
    with pytest.raises(ValueError, match="predictor.target_recall"):
        PredictorTrainConfig(target_recall=0.0)


def test_metrics_by_hand():
    predicted = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], bool)
    fired = np.array([[1, 0, 1, 0], [1, 0, 0, 0]], bool)
    absolute = np.array([[2.0, 0.0, 3.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    acc = MetricsAccumulator()
    acc.add(predicted, fired, absolute)
    m = acc.result()
    assert m.recall == pytest.approx(2 / 3) and m.precision == pytest.approx(2 / 4)
    assert m.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m.predicted_active == 4 / 8 and m.true_active == 3 / 8
    assert m.missed_mass == pytest.approx(3.0 / 10.0)
    assert m.predicted_over_true == pytest.approx(4 / 3)


def test_predictor_module_and_set_checks():
    predictor = LowRankPredictor(8, 3, 20, "relu", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 8))
    expected = jax.nn.relu(x @ predictor.w1[...] + predictor.b1[...]) @ predictor.w2[...] + predictor.b2[...]
    np.testing.assert_allclose(predictor(x), expected, rtol=1e-6)
    linear = LowRankPredictor(8, 3, 20, "none", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(linear(x), (x @ linear.w1[...] + linear.b1[...]) @ linear.w2[...] + linear.b2[...],
                               rtol=1e-6)
    predictors = PredictorSet(TINY, [4, 8], rngs=nnx.Rngs(0))
    assert predictors.param_counts() == [predictor_params(64, 4, 128), predictor_params(64, 8, 128)]
    assert predictors.overhead(TINY)[1] == pytest.approx((64 * 8 + 8 + 8 * 128 + 128) / (3 * 64 * 128))
    assert ffn_params(TINY) == 3 * 64 * 128
    with pytest.raises(ValueError, match="3 predictor ranks for a model of 2 layers"):
        PredictorSet(TINY, [4, 4, 4], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_ff=128 but model"):
        predictors.check_fits(TINY.replace(d_ff=256))
    with pytest.raises(ValueError, match="cover 2 layers but model"):
        predictors.check_fits(TINY.replace(n_layers=3))


def _model():
    return Transformer(TINY.replace(activation="relu"), rngs=nnx.Rngs(0))


def test_dataset_shards_hold_the_inputs_and_firing_masks(tmp_path):
    model = _model()
    sequences = np.asarray(jax.random.randint(jax.random.key(1), (10, 16), 0, 257), np.int32)
    firing = FiringConfig(rule="positive")
    manifest = collect(model, sequences, firing, np.zeros(2), tmp_path / "ds", batch_size=2, batches_per_shard=2,
                       with_abs=True, fingerprint="abc", progress=False)
    assert manifest.shards == 3 and manifest.tokens_per_shard == 64
    _, shards = open_dataset(tmp_path / "ds")
    assert [s.name for s in shards] == ["shard_00000", "shard_00001", "shard_00002"]
    set_capture(model, [CapturePoint.ffn_input, CapturePoint.ffn_hidden])
    _, captured = capture_forward(model, jnp.asarray(sequences))
    set_capture(model, [])
    batches = list(layer_batches(shards, 1, 128, 1000, with_abs=True))
    x = np.concatenate([b.x for b in batches])
    fired = np.concatenate([b.fired for b in batches])
    absolute = np.concatenate([b.abs_hidden for b in batches])
    hidden = np.asarray(captured[CapturePoint.ffn_hidden][1]).reshape(-1, 128)
    np.testing.assert_allclose(x, np.asarray(captured[CapturePoint.ffn_input][1]).reshape(-1, 64), rtol=1e-3,
                               atol=1e-3)  # stored as float16
    np.testing.assert_array_equal(fired, hidden > 0)
    np.testing.assert_allclose(absolute, np.abs(hidden), rtol=1e-3, atol=1e-4)
    # resume: a shard cut by a kill is redone, complete ones are kept
    (tmp_path / "ds" / "shard_00002").rename(tmp_path / "ds" / "shard_00002.tmp")
    before = (tmp_path / "ds" / "shard_00000" / "x_0.npy").stat().st_mtime_ns
    collect(model, sequences, firing, np.zeros(2), tmp_path / "ds", batch_size=2, batches_per_shard=2,
            with_abs=True, fingerprint="abc", progress=False)
    assert (tmp_path / "ds" / "shard_00002").is_dir() and not (tmp_path / "ds" / "shard_00002.tmp").exists()
    assert (tmp_path / "ds" / "shard_00000" / "x_0.npy").stat().st_mtime_ns == before
    with pytest.raises(DatasetError, match="another predictor dataset"):
        collect(model, sequences, firing, np.zeros(2), tmp_path / "ds", batch_size=2, batches_per_shard=2,
                with_abs=True, fingerprint="other", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no manifest.json"):
        open_dataset(tmp_path / "empty")


def _synthetic_shards(folder: Path, n_shards: int, seed: int, d: int = 16, f: int = 64, tokens: int = 512):
    """Firing that a rank-4 predictor can learn exactly: fired = (x U) V > 0.5."""
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(d, 4)), rng.normal(size=(4, f))
    data_rng = np.random.default_rng(seed)
    shards = []
    for index in range(n_shards):
        x = data_rng.normal(size=(tokens, d)).astype(np.float16)
        fired = (x.astype(np.float64) @ u @ v) > 0.5
        shard = folder / f"shard_{index:05d}"
        shard.mkdir(parents=True)
        np.save(shard / "x_0.npy", x)
        np.save(shard / "fired_0.npy", np.packbits(fired, axis=1))
        np.save(shard / "abs_0.npy", np.abs(x.astype(np.float64) @ u @ v).astype(np.float16))
        shards.append(shard)
    return shards


@pytest.mark.parametrize("loss", ["bce", "focal"])
def test_training_learns_a_learnable_firing_pattern(tmp_path, loss):
    train = _synthetic_shards(tmp_path / "train", 3, seed=1)
    val = _synthetic_shards(tmp_path / "val", 2, seed=2)
    cfg = PredictorTrainConfig(hidden_activation="none", loss=loss, epochs=8, batch_tokens=128, lr=1e-2)
    predictor, losses = train_layer(train, 0, 16, 64, 8, cfg)
    assert losses[-1] < 0.5 * losses[0]
    threshold = calibrate(predictor, val[:1], 0, 64, 0.95)
    metrics = measure(predictor, threshold, val[1:], 0, 64, with_abs=True)
    assert metrics.recall > 0.9 and metrics.precision > 0.8
    assert metrics.predicted_over_true < 1.25 and metrics.missed_mass < 0.05


def test_saved_predictors_gate_the_ffn(tmp_path):
    model = _model()
    predictors = PredictorSet(model.config, [4, 6], rngs=nnx.Rngs(3))
    predictors.thresholds[...] = jnp.array([0.1, -0.2])
    save_predictors(tmp_path / "p", predictors, model.config)
    loaded = load_predictors(tmp_path / "p", model.config)
    assert loaded.ranks == (4, 6)
    np.testing.assert_allclose(loaded.thresholds[...], [0.1, -0.2], rtol=1e-6)
    np.testing.assert_array_equal(loaded.layers[1].w2[...], predictors.layers[1].w2[...])
    with pytest.raises(ValueError, match="d_ff"):
        load_predictors(tmp_path / "p", model.config.replace(d_ff=64))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (2, 12)), jnp.int32)
    set_capture(model, [CapturePoint.ffn_input, CapturePoint.ffn_hidden])
    _, dense = capture_forward(model, tokens)
    attach(model, loaded)
    _, gated = capture_forward(model, tokens)
    attach(model, None)
    set_capture(model, [])
    for layer in range(2):
        x = dense[CapturePoint.ffn_input][layer] if layer == 0 else gated[CapturePoint.ffn_input][layer]
        keep = loaded.layers[layer](x) > loaded.thresholds[...][layer]
        expected = jnp.where(keep, gated[CapturePoint.ffn_hidden][layer], 0)
        np.testing.assert_allclose(gated[CapturePoint.ffn_hidden][layer], expected, rtol=1e-6)
        assert 0 < float(keep.mean()) < 1
    logits_after, _ = model(tokens)  # detached again: the dense model
    logits_dense, _ = Transformer(TINY.replace(activation="relu"), rngs=nnx.Rngs(0))(tokens)
    np.testing.assert_allclose(logits_after, logits_dense, rtol=1e-5, atol=1e-5)


def test_task_end_to_end_and_bad_ranks(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text((ROOT / "tests" / "fixtures" / "pydocs_sample" / "tutorial" / "interactive.rst.txt").read_text()
                    * 3)
    command = [
        sys.executable, str(ROOT / "experiments" / "train_predictor.py"), "model=tiny", "model.activation=relu",
        "data=textfile", f"data.path={text}", "data.split=all", f"data.cache_dir={tmp_path / 'cache'}",
        "firing=positive", "dataset.train_tokens=2048", "dataset.validation_tokens=1024", "dataset.seq_len=64",
        "dataset.batches_per_shard=2", "predictor.epochs=2", "predictor.batch_tokens=256", "ranks=[16]",
        "perplexity_tokens=1000", "progress=false", "tracker=noop", "record_as=predictors_tiny",
        f"results_dir={tmp_path / 'results'}", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    result = json.loads((tmp_path / "results" / "predictors_tiny.json").read_text())
    assert len(summary["recall"]) == 2 and summary["ranks"] == [16, 16]
    assert summary["train_pairs"] == 2048
    assert result["metrics"]["perplexity_dense"] == pytest.approx(summary["perplexity_dense"])
    assert [row[0] for row in result["tables"][0]["rows"]] == [0, 1]
    assert all(0 < p <= 1 for p in summary["predicted_active"])
    model_params = TINY.replace(activation="relu").param_count()
    assert summary["predictor_param_share"] == pytest.approx(summary["predictor_params"] / model_params)
    bad = subprocess.run(command[:-1] + [f"hydra.run.dir={tmp_path / 'bad'}", "ranks=[4,4,4]"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "ranks has 3 values; give 1 or n_layers=2" in bad.stderr


def _metrics(over_true: float) -> LayerMetrics:
    return LayerMetrics(recall=0.95, precision=0.95 / over_true, f1=0.9, predicted_active=0.1 * over_true,
                        true_active=0.1, missed_mass=0.01)


def test_adaptive_sizing_picks_the_smallest_rank_within_the_bound():
    candidates = {
        16: [_metrics(1.1), _metrics(2.0), _metrics(3.0)],
        64: [_metrics(1.05), _metrics(1.2), _metrics(2.5)],
        32: [_metrics(1.08), _metrics(1.6), _metrics(2.2)],
    }
    ranks, met = choose_ranks(candidates, 1.25)
    assert ranks == (16, 64, 32) and met == (True, True, False)  # layer 2: no rank fits, the closest is chosen
    assert uniform_rank_of_equal_size(ranks) == 37
    with pytest.raises(ValueError, match="sizing.max_over_true"):
        choose_ranks(candidates, 0.5)
    with pytest.raises(ValueError, match="different layer counts"):
        choose_ranks({16: [_metrics(1.0)], 32: []}, 1.25)


def test_budget_threshold_predicts_the_requested_count():
    logits = np.array([[3.0, 1.0, -1.0, 0.5], [2.0, 0.0, 4.0, -2.0]])
    fired = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], bool)  # 2 firing cells
    threshold = budget_threshold(logits, fired, 1.5)  # 3 predicted cells: 4.0, 3.0, 2.0
    assert (logits > threshold).sum() == 3 and 1.0 <= threshold < 2.0


def test_sizing_run_compares_adaptive_with_uniform(tmp_path):
    from sparse_lm.data import DataConfig
    from sparse_lm.models.loading import ModelSpec
    from sparse_lm.predictors.run import PredictorDataConfig, PredictorRunConfig, SizingConfig, run

    text = tmp_path / "t.txt"
    text.write_text((ROOT / "tests" / "fixtures" / "pydocs_sample" / "tutorial" / "interactive.rst.txt").read_text()
                    * 3)
    cfg = PredictorRunConfig(
        model=ModelSpec(preset="tiny", source="random", activation="relu"),
        data=DataConfig(corpus="textfile", path=str(text), split="all", cache_dir=str(tmp_path / "cache")),
        firing=FiringConfig(rule="positive"),
        dataset=PredictorDataConfig(train_tokens=2048, validation_tokens=1024, seq_len=64, batches_per_shard=2),
        predictor=PredictorTrainConfig(epochs=2, batch_tokens=256),
        sizing=SizingConfig(candidate_ranks=(4, 16), max_over_true=2.0),
        perplexity_tokens=600, progress=False, record_as="predictors_sizing", results_dir=str(tmp_path / "results"),
    )
    summary = run(cfg, tmp_path / "run")
    for layer, rank in enumerate(summary["ranks"]):
        over = summary["candidates"][str(rank)]["predicted_over_true"][layer]
        smaller = [r for r in (4, 16) if r < rank]
        assert summary["sizing_met_bound"][layer] == (over <= 2.0)
        if summary["sizing_met_bound"][layer]:
            assert all(summary["candidates"][str(r)]["predicted_over_true"][layer] > 2.0 for r in smaller)
    assert summary["uniform_rank"] == round(sum(summary["ranks"]) / 2)
    result = json.loads((tmp_path / "results" / "predictors_sizing.json").read_text())
    chosen = sorted(set(summary["ranks"]))
    sizing = f"rank {chosen[0]}" if len(chosen) == 1 else "ranks 4-16"
    assert result["title"] == f"Activation predictors: tiny (relu, positive rule; {sizing} by the 2x bound, " + (
        "2 epochs, 2,048 pairs)")
    assert [row[0] for row in result["tables"][2]["rows"]] == ["adaptive", "uniform"]  # no budget: no profile row
    assert [row[0] for row in result["series"]["layers"]["rows"]] == [0, 1]
    curve = result["tables"][1]["rows"]  # target recalls 0.9, 0.95, 0.99: more recall, more neurons kept
    assert [row[0] for row in curve] == [0.9, 0.95, 0.99]
    assert curve[0][2] <= curve[1][2] <= curve[2][2]
    assert len(result["series"]["candidates"]["rows"]) == 4  # 2 ranks x 2 layers
    assert load_predictors(tmp_path / "run" / "predictors", TINY.replace(activation="relu")).ranks == tuple(
        summary["ranks"])


def test_budget_allocation_is_exact():
    from sparse_lm.predictors.sizing import allocate_ranks

    # layer 0 gains a lot from rank 32, layer 1 almost nothing: the budget of two rank-24 predictors (48)
    # goes to (32, 16)
    scores = {16: [0.60, 0.90], 32: [0.85, 0.91]}
    assert allocate_ranks(scores, 48) == (32, 16)
    assert allocate_ranks(scores, 64) == (32, 32)
    assert allocate_ranks(scores, 32) == (16, 16)
    # brute force over every choice agrees on random scores
    rng = np.random.default_rng(0)
    for _ in range(20):
        table = {r: rng.random(4).tolist() for r in (8, 16, 32)}
        budget = int(rng.integers(32, 129))
        best = max(
            (sum(table[r][i] for i, r in enumerate(choice)), choice)
            for choice in itertools.product((8, 16, 32), repeat=4) if sum(choice) <= budget
        )
        chosen = allocate_ranks(table, budget)
        assert sum(chosen) <= budget
        assert sum(table[r][i] for i, r in enumerate(chosen)) == pytest.approx(best[0])
    with pytest.raises(ValueError, match="below the smallest allocation"):
        allocate_ranks(scores, 20)


def test_budget_sizing_run_spends_the_uniform_budget(tmp_path, text_file):
    from sparse_lm.data import DataConfig
    from sparse_lm.models.loading import ModelSpec
    from sparse_lm.predictors.run import PredictorDataConfig, PredictorRunConfig, SizingConfig, run

    with pytest.raises(ValueError, match="sizing.budget_rank=5 must be one of"):
        SizingConfig(candidate_ranks=(4, 8), budget_rank=5)
    cfg = PredictorRunConfig(
        model=ModelSpec(preset="tiny", source="random", activation="relu"),
        data=DataConfig(corpus="textfile", path=str(text_file), split="all", cache_dir=str(tmp_path / "cache")),
        firing=FiringConfig(rule="nonzero"),
        dataset=PredictorDataConfig(train_tokens=2048, validation_tokens=1024, seq_len=64, batches_per_shard=2),
        predictor=PredictorTrainConfig(epochs=1, batch_tokens=256),
        sizing=SizingConfig(candidate_ranks=(4, 8, 16), budget_rank=8), curve_recalls=(),
        perplexity_tokens=300, progress=False,
    )
    summary = run(cfg, tmp_path / "run")
    assert summary["uniform_rank"] == 8 and sum(summary["ranks"]) <= 16
    candidates = summary["candidates"]
    adaptive = sum(candidates[str(r)]["budget_recall"][i] for i, r in enumerate(summary["ranks"]))
    assert adaptive >= sum(candidates["8"]["budget_recall"]) - 1e-12  # the uniform choice was feasible
    # the profile-guided ranks: same budget, candidates only, measured like the others
    assert sum(summary["profile_ranks"]) <= 16 and set(summary["profile_ranks"]) <= {4, 8, 16}
    profile = sum(candidates[str(r)]["budget_recall"][i] for i, r in enumerate(summary["profile_ranks"])) / 2
    assert summary["profile_budget_recall_mean"] == pytest.approx(profile)
    assert adaptive / 2 >= profile - 1e-12  # the exact allocation is at least as good on its own objective
    assert math.isfinite(summary["profile_perplexity_predicted"])
    assert len(summary["layer_sparsity"]) == 2 and all(0 <= s <= 1 for s in summary["layer_sparsity"])
    assert all(0 < c <= 1 for c in summary["layer_coverage80"])


def _rows_read(shards, layer=0, d_ff=64) -> set[bytes]:
    return {row.tobytes() for batch in layer_batches(shards, layer, d_ff, 100) for row in batch.x}


def _token_ids(shards) -> set[tuple[str, int]]:
    """(shard folder, token index) of every token the shards cover (rows may repeat in content, ids do not)."""
    from sparse_lm.predictors.dataset import ShardHalf

    ids = set()
    for shard in shards:
        folder = shard.path if isinstance(shard, ShardHalf) else shard
        n = len(np.load(folder / "x_0.npy", mmap_mode="r"))
        rows = range(n)[shard.rows(n)] if isinstance(shard, ShardHalf) else range(n)
        ids |= {(str(folder), i) for i in rows}
    return ids


@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_calibration_and_measurement_tokens_are_disjoint(tmp_path, n_shards):
    shards = _synthetic_shards(tmp_path, n_shards, seed=5)
    calibration, measurement = calibration_split(shards)
    calibrated, measured = _rows_read(calibration), _rows_read(measurement)
    assert calibrated and measured and not calibrated & measured
    assert calibrated | measured == _rows_read(shards)


def test_default_run_with_one_validation_shard_calibrates_and_measures_on_disjoint_tokens(tmp_path, monkeypatch):
    """The defaults give a single validation shard: recall must still be measured on tokens the threshold never
    saw (in-sample calibration reads the same tokens in both)."""
    import sparse_lm.predictors.run as predictor_run
    from sparse_lm.data import DataConfig
    from sparse_lm.models.loading import ModelSpec

    seen: dict[str, set[bytes]] = {"calibrate": set(), "measure": set()}

    def recording(name, function):
        def wrapped(predictor, threshold_or_shards, *args, **kwargs):
            shards = threshold_or_shards if name == "calibrate" else args[0]
            seen[name] |= _token_ids(shards)
            return function(predictor, threshold_or_shards, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(predictor_run, "calibrate", recording("calibrate", predictor_run.calibrate))
    monkeypatch.setattr(predictor_run, "measure", recording("measure", predictor_run.measure))
    text = tmp_path / "t.txt"
    text.write_text((ROOT / "tests" / "fixtures" / "pydocs_sample" / "tutorial" / "interactive.rst.txt").read_text()
                    * 3)
    cfg = predictor_run.PredictorRunConfig(
        model=ModelSpec(preset="tiny", source="random", activation="relu"),
        data=DataConfig(corpus="textfile", path=str(text), split="all", cache_dir=str(tmp_path / "cache")),
        firing=FiringConfig(rule="positive"),
        dataset=predictor_run.PredictorDataConfig(train_tokens=1024, validation_tokens=512, seq_len=64),
        predictor=PredictorTrainConfig(epochs=1, batch_tokens=256), ranks=(8,), curve_recalls=(),
        perplexity_tokens=200, progress=False, record_as=None, results_dir=str(tmp_path / "results"),
    )
    predictor_run.run(cfg, tmp_path / "run")
    _, val_shards = open_dataset(next((tmp_path / "run" / "dataset").glob("validation-*")))
    assert len(val_shards) == 1  # the case the defaults hit
    assert seen["calibrate"] and seen["measure"] and not seen["calibrate"] & seen["measure"]
