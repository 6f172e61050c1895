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


def test_sparse_engine_comparison_on_a_tiny_model(tmp_path, text_file):
    from flax import nnx

    from sparse_lm.data import DataConfig
    from sparse_lm.predictors import PredictorSet, save_predictors

    spec = ModelSpec(preset="tiny", source="random", activation="drelu")
    model, _ = build_model(spec)
    predictors = PredictorSet(model.config, [8, 8], rngs=nnx.Rngs(1))
    save_predictors(tmp_path / "predictors", predictors, model.config)
    cfg = DecodeBenchConfig(
        model=spec, new_tokens=6, repeats=2, bandwidth_bytes=1 << 22, predictors=str(tmp_path / "predictors"),
        data=DataConfig(corpus="textfile", path=str(text_file), split="all", cache_dir=str(tmp_path / "cache")),
        calibration_tokens=2048, perplexity_tokens=600, perplexity_context=64, progress=False,
        record_as="sparse_tiny", results_dir=str(tmp_path / "results"),
    )
    summary = run(cfg, tmp_path / "run")
    assert summary["tokens_per_s_sparse"] > 0 and summary["tokens_per_s_dense"] > 0
    assert summary["sparse_speedup"] == pytest.approx(summary["tokens_per_s_sparse"] / summary["tokens_per_s_dense"])
    assert len(summary["capacities"]) == 2 and all(16 <= c <= 128 and c % 16 == 0 for c in summary["capacities"])
    # thresholds 0 on random predictors: about half the neurons predicted, so perplexity moves
    assert 0.2 < summary["predicted_active_mean"] < 0.8
    assert summary["perplexity_sparse"] != pytest.approx(summary["perplexity_dense"], rel=1e-6)
    result = json.loads((tmp_path / "results" / "sparse_tiny.json").read_text())
    assert result["metrics"]["perplexity_change"] == pytest.approx(summary["perplexity_change"])


def test_int4_sparse_engine_comparison_on_a_tiny_model(tmp_path, text_file):
    from sparse_lm.data import DataConfig

    spec = ModelSpec(preset="tiny", source="random", activation="drelu")
    cfg = DecodeBenchConfig(
        model=spec, new_tokens=6, repeats=2, bandwidth_bytes=1 << 22, predictor_kind="int4", int4_recall=0.99,
        data=DataConfig(corpus="textfile", path=str(text_file), split="all", cache_dir=str(tmp_path / "cache")),
        calibration_tokens=2048, perplexity_tokens=600, perplexity_context=64, progress=False,
        record_as="int4_tiny", results_dir=str(tmp_path / "results"),
    )
    summary = run(cfg, tmp_path / "run")
    assert summary["predictor_kind"] == "int4" and summary["int4_target_recall"] == 0.99
    assert summary["recall_validation_mean"] > 0.97  # calibrated on other tokens
    # rows read: fewer than the predicted neurons' three rows; the int4 rows are 9/64 of a float32 row
    assert summary["fired_predicted_mean"] <= summary["gate_passed_mean"] <= summary["predicted_active_mean"] + 1e-9
    config = build_model(spec)[0].config
    assert summary["predictor_bytes"] == config.n_layers * config.d_ff * 2 * (config.d_model // 2 + 4 * config.d_model
                                                                              // 32 + 4)
    assert summary["sparse_floor_tokens_per_s"] > summary["dense_floor_tokens_per_s"]
    assert abs(summary["perplexity_change"]) < 0.05
    free = summary["tokens_per_s_ffn_free"]
    assert summary["ffn_free_speedup"] == pytest.approx(free / summary["tokens_per_s_dense"])
    assert free > 0
    result = json.loads((tmp_path / "results" / "int4_tiny.json").read_text())
    assert result["metrics"]["predictor_kind"] == "int4"


@pytest.mark.parametrize("preset", ["bench_sparse_int4_smollm2_drelu", "bench_sparse_int4_smollm2_fatrelu"])
def test_int4_preset_composes_and_runs_a_tiny_step(preset, tmp_path, text_file):
    register()
    overrides = [f"experiment={preset}", "model.source=random", "model.preset=tiny",
                 "model.path=null", "model.activation=drelu", "data=textfile", f"data.path={text_file}",
                 "data.split=all", f"data.cache_dir={tmp_path / 'cache'}", "llama_cpp=false", "new_tokens=4",
                 "repeats=1", "bandwidth_bytes=4194304", "calibration_tokens=1024", "perplexity_tokens=300",
                 "perplexity_context=64", "progress=false", f"results_dir={tmp_path / 'results'}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = to_config(compose("bench_decode", overrides=overrides))
    assert cfg.predictor_kind == "int4" and cfg.int4_recall == 0.99
    assert cfg.record_as == preset
    summary = run(cfg, tmp_path / "run")
    assert summary["predictor_kind"] == "int4" and summary["tokens_per_s_sparse"] > 0
    assert (tmp_path / "results" / f"{preset}.json").exists()


def test_int4_with_a_predictor_folder_is_refused():
    with pytest.raises(ValueError, match="predictors=runs/x is a folder of trained predictors; predictor_kind=int4"):
        DecodeBenchConfig(predictor_kind="int4", predictors="runs/x")
    with pytest.raises(ValueError, match="int4_recall must be in"):
        DecodeBenchConfig(predictor_kind="int4", int4_recall=0.0)


def test_llama_cpp_without_the_bench_extra_is_a_clear_error(tmp_path, monkeypatch):
    from sparse_lm.bench import llama_cpp

    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    cfg = DecodeBenchConfig(model=TINY_SPEC, new_tokens=4, repeats=1, bandwidth_bytes=1 << 22, llama_cpp=True)
    with pytest.raises(ValueError, match=r"llama_cpp=true needs llama-cpp-python: pip install -e '.\[bench\]'"):
        run(cfg, tmp_path / "run")


@pytest.mark.real_model
def test_f32_gguf_keeps_metadata_and_dequantised_values(tmp_path):
    import gguf
    import numpy as np

    from sparse_lm.bench.llama_cpp import write_f32_gguf
    from sparse_lm.models.gguf_loader import smollm2_gguf_path

    source = gguf.GGUFReader(str(smollm2_gguf_path()))
    written = gguf.GGUFReader(str(write_f32_gguf(smollm2_gguf_path(), tmp_path / "f32.gguf")))
    assert len(written.tensors) == len(source.tensors) == 272
    assert {t.tensor_type for t in written.tensors} == {gguf.GGMLQuantizationType.F32}
    assert written.fields["general.file_type"].contents() == 0
    for key in ("llama.block_count", "llama.rope.freq_base", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert written.fields[key].contents() == source.fields[key].contents()
    by_name = {t.name: t for t in written.tensors}
    for tensor in source.tensors[:3] + source.tensors[-2:]:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_array_equal(np.asarray(by_name[tensor.name].data).reshape(expected.shape), expected)
