"""The FFN benchmark: floors from byte counts, one quick run's record, bad configs."""

from __future__ import annotations

import json

import pytest

from sparse_lm.bench.ffn import FfnBenchConfig, FfnShape, dense_ffn_bytes, run, sparse_ffn_bytes


def test_byte_counts_and_shapes():
    assert FfnShape.llama7b.dims[:2] == (4096, 11008)
    assert dense_ffn_bytes(4096, 11008, gated=True) == 3 * 4096 * 11008 * 4  # 541 MB
    assert sparse_ffn_bytes(4096, 1101, gated=True) == 3 * 4096 * 1101 * 4 + 4 * 1101
    assert dense_ffn_bytes(10, 20, gated=False) == 2 * 10 * 20 * 4


def test_quick_run_records_speedups_and_floors(tmp_path):
    cfg = FfnBenchConfig(shape="smollm2", fractions=(0.1, 0.5), rounds=2, flush_bytes=1 << 20,
                         bandwidth_bytes=1 << 20, progress=False, record_as="bench_ffn_quick",
                         results_dir=str(tmp_path / "results"))
    summary = run(cfg, tmp_path / "run")
    assert summary["speedup_implementation"] == "ffi"
    assert set(summary["speedup_vs_dense"]) == set(summary["floor_speedup"]) == {"0.1", "0.5"}
    assert summary["floor_speedup"]["0.1"] == pytest.approx(
        dense_ffn_bytes(576, 1536, True) / sparse_ffn_bytes(576, 154, True))
    for impl in ("xla", "ffi"):
        assert all(0 < v < float("inf") for v in summary[f"speedup_vs_dense_{impl}"].values())
    assert [len(summary["times_ms"][name]) for name in ("dense", "xla@0.1", "ffi@0.5")] == [2, 2, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["d_ff"] == 1536
    result = json.loads((tmp_path / "results" / "bench_ffn_quick.json").read_text())
    assert [row[0] for row in result["tables"][0]["rows"]] == [0.1, 0.5]
    assert result["metrics"]["floor_speedup_0.5"] == pytest.approx(summary["floor_speedup"]["0.5"])


def test_bad_configs_name_the_key():
    with pytest.raises(ValueError, match=r"shape='gpt5' is not one of: smollm2, llama7b"):
        FfnBenchConfig(shape="gpt5")
    with pytest.raises(ValueError, match=r"fractions must be in \(0, 1\]"):
        FfnBenchConfig(fractions=(0.0,))
    with pytest.raises(ValueError, match="implementations: unknown 'cuda'"):
        FfnBenchConfig(implementations=("cuda",))
