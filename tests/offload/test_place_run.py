"""The placement experiment: config, measured and synthetic profiles, summary, gpu-index file, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from experiments.common import to_config
from experiments.schemas import register
from sparse_lm.offload.gpu_index import read_gpu_index
from sparse_lm.offload.placement import PlacementInfeasible
from sparse_lm.offload.run import PlaceRunConfig, run
from sparse_lm.offload.sizes import parse_size
from sparse_lm.profiling.counts import FiringCounts

REPO = Path(__file__).resolve().parents[2]


def composed(*overrides: str) -> PlaceRunConfig:
    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return to_config(compose(config_name="place", overrides=list(overrides)))


def test_parse_size():
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("500 MB") == 500_000_000
    assert parse_size("1e3") == 1000
    assert parse_size("25%", 400) == 100
    with pytest.raises(ValueError, match="budget='8 parsecs': unknown unit 'parsecs'"):
        parse_size("8 parsecs", key="budget")
    with pytest.raises(ValueError, match="needs something to be a share of"):
        parse_size("5%")


def test_synthetic_run_on_the_default_profile(tmp_path):
    cfg = composed("model_shape=smollm2_135m", "budget=25%", "precision=fp32")
    summary = run(cfg, tmp_path)
    neuron_bytes = 3 * 576 * 4
    assert summary["neuron_bytes"] == neuron_bytes
    assert summary["capacity_neurons"] == int(0.25 * 30 * 1536 * neuron_bytes) // neuron_bytes == 11520
    assert summary["fast_neurons"] == 11520  # 1536 is a multiple of 64: every group fits
    assert summary["synthetic_profile"] and "synthetic power law" in summary["profile"]
    assert summary["objective"] >= summary["objective_greedy"] > 0
    # the default profile is calibrated to our SmolLM2 measurement: the top quarter makes about 2/3 of firings
    assert 0.6 < summary["fast_firing_share"] < 0.72
    mask, capacity = read_gpu_index(tmp_path / "placement.gpuidx")
    assert mask.shape == (30, 1536) and mask.sum() == 11520 and capacity == summary["budget_bytes"]
    assert json.loads((tmp_path / "summary.json").read_text())["objective"] == summary["objective"]
    assert json.loads((tmp_path / "config.json").read_text())["solver"] == "ilp"


def test_measured_profile_is_used_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    counts = FiringCounts.zeros(30, 1536)
    counts.add(rng.integers(0, 100, (30, 1536)), np.zeros((30, 1536)), tokens=100)
    path = counts.save(tmp_path / "counts_total.npz")
    cfg = composed("model_shape=smollm2_135m", "budget=10%", "solver=greedy", f"profile={path}")
    summary = run(cfg, tmp_path / "run")
    assert summary["profile"].startswith("measured") and not summary["synthetic_profile"]
    frequencies = counts.counts / counts.tokens
    top = np.sort(frequencies.reshape(-1))[::-1]
    # group prefixes of 64: the objective is at most the global top-k and close to it
    assert top[: summary["fast_neurons"]].sum() * 0.98 < summary["objective"] <= top[: summary["fast_neurons"]].sum()
    with pytest.raises(ValueError, match="do not fit model_shape=llama7b"):
        run(composed("model_shape=llama7b", f"profile={path}"), tmp_path / "bad")


def test_budget_below_the_attention_weights_is_infeasible(tmp_path):
    with pytest.raises(PlacementInfeasible, match="budget=1GiB .* attention weights of llama7b"):
        run(composed("budget=1GiB", "reserve_attention=true"), tmp_path)


def test_bad_keys_are_named():
    with pytest.raises(KeyError, match="unknown model shape 'gpt5'"):
        PlaceRunConfig(model_shape="gpt5")
    with pytest.raises(ValueError, match="solver='simplex' is not one of: ilp, greedy"):
        PlaceRunConfig(solver="simplex")
    with pytest.raises(ValueError, match="synthetic.active_fraction must be values in"):
        composed("synthetic.active_fraction=[0.0]")


def test_cli_writes_the_interface_fields(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "place.py"), "model_shape=smollm2_135m", "solver=greedy",
         "budget=10%", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["solver"] == "greedy" and summary["solve_seconds"] > 0 and summary["objective"] > 0
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    bad = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "place.py"), "budget=lots", f"hydra.run.dir={tmp_path}/bad"],
        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "budget='lots' is not a size" in bad.stderr


def test_hardware_mode_projects_every_policy(tmp_path):
    cfg = composed("experiment=place_sweep_llama7b", "hardware=pc_low", "solver=ilp", "budget=9GiB")
    summary = run(cfg, tmp_path)
    assert summary["hardware"] == "pc_low" and summary["model_shape"] == "llama_reglu_7b"
    # PC-Low: 0.8 x 616 GB/s GPU, 0.8 x 38.4 GB/s DRAM, two 25 us hand-offs; a neuron is 3 x 4096 fp16 weights
    neuron = 3 * 4096 * 2
    saving = neuron / (0.8 * 38.4e9) - neuron / (0.8 * 616e9)
    assert summary["min_neurons"] == int(np.ceil(50e-6 / saving))
    assert np.all((np.array(summary["fast_neurons_per_layer"]) == 0)
                  | (np.array(summary["fast_neurons_per_layer"]) >= summary["min_neurons"]))
    assert 0 < summary["capacity_neurons"] < 32 * 11008
    assert summary["reserved_bytes"] == summary["budget_bytes"] - summary["capacity_neurons"] * neuron
    # the placement serves more than its share of neurons: the profile is skewed
    assert summary["fast_firing_share"] > summary["fast_fraction"]
    tps = {k: summary[f"projected_tokens_per_s_{k}"] for k in ("layer_split", "flexgen", "all_fast")}
    assert summary["projected_tokens_per_s"] > tps["layer_split"] > tps["flexgen"] > 0
    assert not summary["all_fast_fits"]  # 13.5 GB does not fit 9 GiB
    assert summary["projected_speedup_over_layer_split"] == pytest.approx(
        summary["projected_tokens_per_s"] / tps["layer_split"])
    with pytest.raises(PlacementInfeasible, match="budget=1GiB .* CUDA context"):
        run(composed("hardware=pc_high", "budget=1GiB"), tmp_path / "tiny")
    with pytest.raises(ValueError, match="hardware.name='pc_mid' is not one of"):
        composed("hardware=pc_high", "hardware.name=pc_mid")


def test_sweep_record_and_figure(tmp_path, make_figures):
    from sparse_lm.offload.report import collect_place_sweep

    sweep = tmp_path / "sweep"
    for n, (hardware, solver, budget) in enumerate(
        [("pc_low", "ilp", "8GiB"), ("pc_low", "greedy", "8GiB"), ("pc_low", "ilp", "10GiB"),
         ("pc_low", "greedy", "10GiB")]
    ):
        run(composed("experiment=place_sweep_llama7b", f"hardware={hardware}", f"solver={solver}",
                     f"budget={budget}"), sweep / str(n))
    path = collect_place_sweep(sweep, "place_sweep_test", tmp_path / "results", "pytest")
    result = json.loads(path.read_text())
    rows = result["tables"][0]["rows"]
    assert [(r[0], r[1], r[2]) for r in rows] == [("pc_low", "greedy", 8.0), ("pc_low", "greedy", 10.0),
                                                  ("pc_low", "ilp", 8.0), ("pc_low", "ilp", 10.0)]
    assert result["metrics"]["ilp_never_below_greedy"] is True
    # more GPU memory, more neurons there, faster projected decode
    assert rows[3][3] > rows[2][3] and rows[3][9] > rows[2][9]
    from figure_registry import find_figure

    written = find_figure("place_sweep_test")(result, tmp_path / "figures")
    assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 10_000 for p in written)


def test_record_as_writes_a_result(tmp_path):
    cfg = composed("model_shape=smollm2_135m", "solver=greedy", "budget=10%", "record_as=place_quick",
                   f"results_dir={tmp_path / 'results'}")
    summary = run(cfg, tmp_path / "run")
    result = json.loads((tmp_path / "results" / "place_quick.json").read_text())
    assert result["metrics"]["objective"] == summary["objective"] and result["metrics"]["solver"] == "greedy"
