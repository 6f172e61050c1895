"""The frontier task on a tiny model over the real corpora: rows, measured sparsity, resume, trained rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sparse_lm.eval.frontier import FrontierConfig, FrontierRunConfig, run
from sparse_lm.models.loading import ModelSpec
from sparse_lm.tracking import TrackerConfig

pytestmark = pytest.mark.real_corpus


def _config(tmp_path, **changes) -> FrontierRunConfig:
    frontier = dict(methods=("teal", "stat_topk", "teal_greedy", "teal_greedy_output"), targets=(0.5, 0.8),
                    tokens=512, context=64,
                    calibration_tokens=256, sparsity_windows=2, progress=False,
                    prompts=("In the beginning",), sample_tokens=5)
    frontier.update(changes)
    return FrontierRunConfig(model=ModelSpec(preset="tiny", source="random"), frontier=FrontierConfig(**frontier),
                             tracker=TrackerConfig(kind="noop"), record_as="frontier_tiny",
                             results_dir=str(tmp_path / "results"))


def test_rows_sparsity_and_resume(tmp_path):
    summary = run(_config(tmp_path), tmp_path / "run")
    rows = {(r["method"], r["target"]): r for r in summary["rows"]}
    assert len(rows) == 1 + 4 * 2
    dense = rows[("dense", 0.0)]
    assert dense["sparsity_web"] == 0.0 and dense["increase_percent_web"] == 0.0
    for method in ("teal", "teal_greedy", "teal_greedy_output"):
        for target in (0.5, 0.8):
            # calibrated on training tokens, measured on validation tokens: close to the allocated mean, not equal
            allocated = np.mean(rows[(method, target)]["layer_targets"])
            assert rows[(method, target)]["sparsity_web"] == pytest.approx(allocated, abs=0.05)
            assert rows[(method, target)]["sparsity_pydocs"] == pytest.approx(allocated, abs=0.05)
    assert np.mean(rows[("teal_greedy_output", 0.8)]["layer_targets"]) == pytest.approx(0.8, abs=0.013)
    # the loss-based allocation works on a coarser grid (LOSS_GRID): its mean overshoots by less than one step
    assert 0.8 <= np.mean(rows[("teal_greedy", 0.8)]["layer_targets"]) < 0.85
    assert 0.5 <= np.mean(rows[("teal_greedy", 0.5)]["layer_targets"]) <= 0.65
    # the Gaussian cutoff is not calibrated: its sparsity is whatever the gate statistics give
    assert 0.6 < rows[("stat_topk", 0.8)]["sparsity_web"] < 0.95
    assert len(dense["samples"]) == 1 and dense["samples"][0]  # a greedy continuation of the prompt
    record = json.loads((tmp_path / "results" / "frontier_tiny.json").read_text())
    samples = next(t for t in record["tables"] if t["title"] == "Greedy samples")
    assert samples["rows"] == [["dense", "In the beginning", dense["samples"][0]]]
    assert record["metrics"]["dense_perplexity_web"] == pytest.approx(dense["perplexity_web"])
    # a rerun reads the saved points instead of measuring again
    point = tmp_path / "run" / "points" / "teal_50.json"
    saved = json.loads(point.read_text())
    saved["perplexity_web"] = 123.0
    point.write_text(json.dumps(saved))
    again = run(_config(tmp_path), tmp_path / "run")
    assert next(r for r in again["rows"] if r["method"] == "teal" and r["target"] == 0.5)["perplexity_web"] == 123.0
    with pytest.raises(ValueError, match=r"other settings \(context\)"):
        run(_config(tmp_path, context=32), tmp_path / "run")


def test_bad_method_and_missing_run_are_named(tmp_path):
    with pytest.raises(ValueError, match="frontier.methods"):
        _config(tmp_path, methods=("teal", "magic"))
    with pytest.raises(FileNotFoundError, match="frontier.trained.mine"):
        _config(tmp_path, trained={"mine": str(tmp_path / "nowhere")})


def test_trained_run_is_a_row_with_its_exact_zeros_and_command(text_file, tmp_path):
    from sparse_lm.train.run import TrainingDivergedError
    from sparse_lm.train.run import run as train
    from tests.train.conftest import tiny_run_config

    # a run stopped after its step-2 checkpoint (the NaN guard at step index 2), scored, then resumed to the end
    with pytest.raises(TrainingDivergedError):
        train(tiny_run_config(text_file, tmp_path, steps=4, eval_every=2, nan_at_step=2), tmp_path / "train")
    config = _config(tmp_path, methods=("teal",), targets=(0.5,), trained={"drelu": str(tmp_path / "train")})
    early = run(config, tmp_path / "run")["rows"][-1]
    assert early["method"] == "drelu" and math.isnan(early["target"]) and early["activation"] == "drelu"
    assert early["trained_tokens"] == 2 * 4 * 32  # 2 steps of 4 x 32 tokens
    train_summary = train(tiny_run_config(text_file, tmp_path, steps=4, eval_every=2), tmp_path / "train")
    summary = run(config, tmp_path / "run")
    rows = [r for r in summary["rows"] if r["method"] == "drelu"]
    # scoring the run again after more training adds a row at its new checkpoint and keeps the earlier one
    assert [r["trained_tokens"] for r in rows] == [2 * 4 * 32, train_summary["tokens"]]
    assert rows[0]["perplexity_web"] == early["perplexity_web"] != rows[1]["perplexity_web"]
    row = rows[1]
    assert row["command"] == train_summary["command"]
    # dReLU zeroes about three quarters of a random model's hidden values (both gate and up must be positive)
    assert 0.6 < row["sparsity_web"] < 0.9
    assert len(row["samples"]) == 1
    record = json.loads((tmp_path / "results" / "frontier_tiny.json").read_text())
    assert {f"drelu_{n}_increase_web" for n in (2 * 4 * 32, train_summary["tokens"])} <= record["metrics"].keys()
    curve = next(t for t in record["tables"] if t["title"] == "Training curve of drelu")
    assert [r[0] for r in curve["rows"]] == [0, 256, train_summary["tokens"]]  # evaluations at steps 0, 2 and 4
    # the run's throughput: the finished run's summary and the frontier row read the same steps and peak
    assert row["tokens_per_s"] == pytest.approx(train_summary["tokens_per_s"])
    assert row["flops_per_token"] == train_summary["flops_per_token"]
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / (row["matmul_peak_gflops"] * 1e9))
    made = next(t for t in record["tables"] if t["title"] == "Trained rows: how each was made")
    assert [r[0] for r in made["rows"]] == ["drelu (256 tokens)", f"drelu ({train_summary['tokens']:,} tokens)"]
    assert made["rows"][1][3] == pytest.approx(row["tokens_per_s"]) and made["rows"][1][4] == pytest.approx(row["mfu"])


def test_trained_runs_compose_from_the_command_line(tmp_path):
    # the form the README and `make frontier` use: frontier.trained starts empty, so new keys need ++
    from tests.profiling.test_profile_experiment import compose_config

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_config.json").write_text("{}")
    cfg = compose_config("frontier", [f"++frontier.trained={{a:{tmp_path / 'a'},b:{tmp_path / 'b'}}}"])
    assert cfg.frontier.trained == {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
