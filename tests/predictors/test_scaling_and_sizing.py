"""Predictor scaling study (trained curves and the projection reference), profile-guided sizing, the training
pairs' profile, and the one-record summary of a predictor sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from experiments.common import to_config
from experiments.schemas import register
from sparse_lm.data import DataConfig
from sparse_lm.models.loading import ModelSpec
from sparse_lm.predictors.dataset import firing_counts
from sparse_lm.predictors.report import collect_predictor_sweep
from sparse_lm.predictors.run import PredictorDataConfig
from sparse_lm.predictors.scaling import (
    Pairs,
    ScalingConfig,
    ScalingRunConfig,
    overhead_of_rank,
    projection_reference,
    ratio_at_recall,
    run,
)
from sparse_lm.predictors.sizing import profile_guided_ranks
from sparse_lm.predictors.train import PredictorTrainConfig
from sparse_lm.profiling.firing import FiringConfig

ROOT = Path(__file__).resolve().parents[2]


def test_profile_guided_ranks_follow_density_and_spread():
    # layer 0: dense and even (hard); layer 2: sparse and skewed (easy)
    ranks, targets = profile_guided_ranks([0.5, 0.8, 0.95], [0.8, 0.5, 0.2], [8, 16, 32, 64], budget=3 * 32)
    assert targets[0] > targets[1] > targets[2]
    assert sum(targets) == pytest.approx(96)
    assert ranks[0] >= ranks[1] >= ranks[2] and sum(ranks) <= 96 and set(ranks) <= {8, 16, 32, 64}
    # equal layers share the budget equally
    ranks, _ = profile_guided_ranks([0.7] * 4, [0.5] * 4, [16, 32, 64], budget=4 * 32)
    assert ranks == (32, 32, 32, 32)
    with pytest.raises(ValueError, match="one length"):
        profile_guided_ranks([0.5, 0.5], [0.5], [8], budget=16)


def test_firing_counts_profile_the_shards(tmp_path):
    rng = np.random.default_rng(0)
    fired = [rng.random((2, 50, 24)) < p for p in (0.2, 0.6)]  # 2 shards x 2 layers
    shards = []
    for index, per_shard in enumerate(zip(*fired, strict=True)):
        shard = tmp_path / f"shard_{index:05d}"
        shard.mkdir()
        for layer, bits in enumerate(per_shard):
            np.save(shard / f"fired_{layer}.npy", np.packbits(bits, axis=1))
        shards.append(shard)
    counts, tokens = firing_counts(shards, 2, 24)
    assert tokens == 100
    np.testing.assert_array_equal(counts[0], fired[0].sum(axis=(0, 1)))
    np.testing.assert_array_equal(counts[1], fired[1].sum(axis=(0, 1)))


def test_ratio_at_recall_by_hand():
    fired = np.array([[True, True, False, False]])
    scores = np.array([[4.0, 1.0, 3.0, 0.0]])
    # recall 1 needs a threshold below 1.0: cells 4, 3 and 1 are predicted, 3 for 2 firing
    out = ratio_at_recall((scores, fired), (scores, fired), 1.0, budget_ratio=1.0)
    assert out == {"recall": 1.0, "predicted_over_true": 1.5, "budget_recall": 0.5}


def test_projection_reference_is_exact_at_full_rank_and_worse_below():
    rng = np.random.default_rng(0)
    d, f = 12, 40
    gate, up = rng.normal(size=(d, f)), rng.normal(size=(d, f))
    x = rng.normal(size=(3000, d)) @ np.diag(np.linspace(3, 0.2, d))  # a few directions dominate

    def pairs(rows):
        return Pairs(rows.astype(np.float32), ((rows @ gate) > 0) & ((rows @ up) > 0))

    rows = projection_reference([gate, up], x[:2000], pairs(x[2000:2500]), pairs(x[2500:]), (2, 6, 12, 99), 0.95,
                                1.25)
    assert [r["rank"] for r in rows] == [2, 6, 12]  # ranks above d_model are skipped
    assert [r["predictor_rank"] for r in rows] == [4, 12, 24]  # gate and up each
    full = rows[-1]
    assert full["budget_recall"] == pytest.approx(1.0, abs=0.01)  # exact scores: the firing cells rank first
    assert full["predicted_over_true"] <= 1.0 + 1e-9  # no false positive at recall 0.95
    assert rows[0]["predicted_over_true"] > rows[1]["predicted_over_true"] > full["predicted_over_true"]


def test_overhead_of_rank():
    # SmolLM2: rank 96 on a gated FFN 576 x 1536 is 7.7% of its FLOPs
    assert overhead_of_rank(96, 576, 1536, gated=True) == pytest.approx(0.0770, abs=1e-4)
    assert overhead_of_rank(10, 10, 10, gated=False) == pytest.approx((100 + 10 + 100 + 10) / 200)


def test_scaling_config_errors():
    with pytest.raises(ValueError, match="scaling.ranks must be a non-empty list of positive"):
        ScalingConfig(ranks=(0, 4))
    with pytest.raises(ValueError, match="scaling.layers"):
        ScalingConfig(layers=(-1,))
    with pytest.raises(ValueError, match="exceeds dataset.train_tokens=1024; raise dataset.train_tokens"):
        ScalingRunConfig(dataset=PredictorDataConfig(train_tokens=1024), scaling=ScalingConfig(train_tokens=(2048,)))


def _scaling_config(text_file: Path, tmp_path: Path, **scaling) -> ScalingRunConfig:
    return ScalingRunConfig(
        model=ModelSpec(preset="tiny", source="random", activation="drelu"),
        data=DataConfig(corpus="textfile", path=str(text_file), split="all", cache_dir=str(tmp_path / "cache")),
        firing=FiringConfig(rule="nonzero"),
        dataset=PredictorDataConfig(train_tokens=2048, validation_tokens=1024, seq_len=64, batches_per_shard=2),
        predictor=PredictorTrainConfig(batch_tokens=256),
        scaling=ScalingConfig(**{"layers": (0, 1), "train_tokens": (512, 2048), "ranks": (4, 16), "epochs": (1, 3),
                                 "projection_ranks": (4, 64), "projection_tokens": 1024, "train_check_tokens": 512,
                                 **scaling}),
        progress=False, record_as="scaling_tiny", results_dir=str(tmp_path / "results"),
    )


def test_scaling_run_end_to_end(text_file, tmp_path):
    summary = run(_scaling_config(text_file, tmp_path), tmp_path / "run")
    trained = summary["trained"]
    assert len(trained) == 2 * 2 * 2 * 2  # layers x pair counts x ranks x measured epochs
    for row in trained:
        n_batches = row["train_pairs"] // 256
        assert row["steps"] == row["epoch"] * n_batches
        assert row["val_recall"] >= 0.9  # calibrated to 0.95 on the other half of the validation pairs
        assert row["val_predicted_over_true"] >= row["val_recall"] - 1e-9
    assert {r["train_pairs"] for r in trained} == {512, 2048}
    projection = {(r["layer"], r["rank"]): r for r in summary["projection"]}
    assert set(projection) == {(0, 4), (0, 64), (1, 4), (1, 64)}  # 64 = d_model of the tiny model: exact
    for layer in (0, 1):
        assert projection[(layer, 64)]["predicted_over_true"] <= 1.0 + 1e-9
        assert projection[(layer, 4)]["predicted_over_true"] > projection[(layer, 64)]["predicted_over_true"]
    assert (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "partial.json").exists()
    result = json.loads((tmp_path / "results" / "scaling_tiny.json").read_text())
    assert len(result["tables"][0]["rows"]) == 2 * 2 * 2  # the last epoch of every fit
    assert len(result["series"]["trained"]["rows"]) == 16
    assert len(result["series"]["projection"]["rows"]) == 4


def test_scaling_run_rejects_a_layer_outside_the_model(text_file, tmp_path):
    with pytest.raises(ValueError, match=r"scaling.layers \[5\] out of range: the model has 2 layers"):
        run(_scaling_config(text_file, tmp_path, layers=(0, 5)), tmp_path / "run")


def _fake_run(folder: Path, loss: str, over: float, rule: str = "nonzero") -> None:
    folder.mkdir(parents=True)
    config = {"predictor": {"hidden_activation": "relu", "loss": loss, "focal_gamma": 2.0, "epochs": 2},
              "firing": {"target_sparsity": 0.9}}
    summary = {"model": "m", "firing_rule": rule, "ranks": [8, 8], "recall_mean": 0.95, "precision_mean": 0.5,
               "true_active_mean": 0.2, "predicted_active_mean": 0.2 * over, "predicted_over_true": over,
               "budget_recall_mean": 0.8, "missed_mass_mean": 0.01, "perplexity_dense": 10.0,
               "perplexity_predicted": 10.5, "perplexity_change": 0.05, "predictor_params": 100}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "summary.json").write_text(json.dumps(summary))


def test_predictor_sweep_record(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", "bce", 1.4)
    _fake_run(sweep / "1", "focal", 1.3, rule="topk")
    _fake_run(sweep / "10", "bce", 1.6)
    (sweep / "2").mkdir()  # an unfinished run is skipped
    path = collect_predictor_sweep(sweep, "sweep_record", tmp_path / "results", "python x")
    result = json.loads(path.read_text())
    rows = result["tables"][0]["rows"]
    assert [row[:3] for row in rows] == [["nonzero", "relu", "bce"], ["topk@0.9", "relu", "focal(gamma 2.0)"],
                                         ["nonzero", "relu", "bce"]]
    assert result["metrics"]["best_predicted_over_true"] == 1.3
    assert result["metrics"]["best_run"].startswith("firing=topk@0.9")
    with pytest.raises(FileNotFoundError, match="no finished run"):
        collect_predictor_sweep(tmp_path / "nothing", "x", tmp_path / "results", "python x")
    (sweep / "0" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        collect_predictor_sweep(sweep, "x", tmp_path / "results", "python x")


def test_scaling_and_sweep_presets_compose():
    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        scaling = to_config(compose("predictor_scaling", overrides=["experiment=predictor_scaling_smollm2_drelu"]))
        sweep = compose("train_predictor", overrides=["experiment=predictor_sweep_scratch"], return_hydra_config=True)
    assert scaling.firing.rule.value == "nonzero" and scaling.scaling.layers == (2, 14, 27)
    assert max(scaling.scaling.train_tokens) == scaling.dataset.train_tokens == 262144
    assert sweep.hydra.sweeper.params == {"predictor": "powerinfer,dejavu,focal", "firing": "nonzero,topk"}
    assert sweep.hydra.callbacks.sweep_result._target_ == "experiments.callbacks.PredictorSweepResult"
