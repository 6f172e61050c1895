"""The decode benchmark on a tiny model: one short run, its summary, its result file and its Hydra config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.common import to_config
from experiments.schemas import register
from sparse_lm.bench.bandwidth import measure_read_bandwidth
from sparse_lm.bench.decode import DecodeBenchConfig, run, weight_bytes
from sparse_lm.models.loading import ModelSpec, build_model

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY_SPEC = ModelSpec(preset="tiny", source="random")


def test_tiny_run_writes_consistent_summary_and_result(tmp_path):
    cfg = DecodeBenchConfig(
        model=TINY_SPEC,
        new_tokens=4,
        repeats=2,
        bandwidth_bytes=1 << 22,
        record_as="decode_tiny",
        results_dir=str(tmp_path / "results"),
    )
    summary = run(cfg, tmp_path / "run")
    model, _ = build_model(TINY_SPEC)
    assert summary["weight_bytes_per_token"] == weight_bytes(model) == 4 * model.config.param_count()
    floor = summary["read_bandwidth_gb_per_s"] * 1e9 / summary["weight_bytes_per_token"]
    assert summary["bandwidth_floor_tokens_per_s"] == pytest.approx(floor)
    assert summary["fraction_of_floor"] == pytest.approx(summary["sparse_lm_tokens_per_s"] / floor)
    assert summary["sparse_lm_tokens_per_s"] > 0 and summary["matvec_only_tokens_per_s"] > 0
    assert len(summary["sparse_lm_tokens_per_s_runs"].split(", ")) == 2
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["sparse_lm_tokens_per_s"] == summary["sparse_lm_tokens_per_s"]
    result = json.loads((tmp_path / "results" / "decode_tiny.json").read_text())
    assert result["metrics"]["model"] == "tiny" and result["command"]


def test_bandwidth_is_plausible_and_arguments_checked():
    assert 1e8 < measure_read_bandwidth(1 << 24, repeats=2) < 1e12
    with pytest.raises(ValueError):
        measure_read_bandwidth(0)


def test_hydra_config_composes_to_the_schema():
    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = to_config(compose("bench_decode", overrides=["model=tiny", "new_tokens=8"]))
    assert isinstance(cfg, DecodeBenchConfig)
    assert (cfg.model.preset, cfg.new_tokens, cfg.repeats) == ("tiny", 8, 3)
    with pytest.raises(ValueError, match="repeats"):
        DecodeBenchConfig(repeats=0)
