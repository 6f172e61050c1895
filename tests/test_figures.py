"""analysis/make_figures.py: the figure registry and the decode benchmark figure."""

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from sparse_lm.results import write_result

REPO_ROOT = Path(__file__).resolve().parents[1]
MACHINE = {
    "cpu_model": "Test CPU",
    "cores_logical": 2,
    "cores_usable": 2,
    "memory_gib": 8.0,
    "jax_backend": "cpu",
}
DECODE_METRICS = {
    "model": "SmolLM2-135M",
    "sparse_lm_tokens_per_s": 41.3,
    "bandwidth_floor_tokens_per_s": 95.2,
    "llama_cpp_f32_tokens_per_s": 52.7,
    "llama_cpp_f32_paper_tokens_per_s": 60.0,
}


def write(results_dir, name, metrics):
    write_result(
        name, metrics, command="python bench.py", title=name, results_dir=results_dir, machine=MACHINE
    )


def test_decode_bars_values_and_order(make_figures):
    bars = make_figures.decode_benchmark_bars(DECODE_METRICS)
    assert [(metric, value) for metric, _, value in bars] == [
        ("bandwidth_floor_tokens_per_s", 95.2),
        ("sparse_lm_tokens_per_s", 41.3),
        ("llama_cpp_f32_tokens_per_s", 52.7),
        ("llama_cpp_f32_paper_tokens_per_s", 60.0),
    ]
    required_only = make_figures.decode_benchmark_bars(
        {"sparse_lm_tokens_per_s": 4, "bandwidth_floor_tokens_per_s": 9}
    )
    assert [label for _, label, _ in required_only] == ["memory-bandwidth bound", "sparse_lm"]
    with pytest.raises(ValueError, match="bandwidth_floor_tokens_per_s"):
        make_figures.decode_benchmark_bars({"sparse_lm_tokens_per_s": 4.0})
    with pytest.raises(ValueError, match="sparse_lm_tokens_per_s"):
        make_figures.decode_benchmark_bars(
            {"sparse_lm_tokens_per_s": "fast", "bandwidth_floor_tokens_per_s": 9}
        )


def test_registry_matches_name_and_variants(make_figures):
    draw = make_figures.draw_decode_benchmark
    assert make_figures.find_figure("decode_benchmark") is draw
    assert make_figures.find_figure("decode_benchmark_smollm2") is draw
    assert make_figures.find_figure("decode_benchmark-avx512") is draw
    assert make_figures.find_figure("decode_benchmarks") is None
    assert make_figures.find_figure("perplexity") is None


def test_draws_decode_figure_and_skips_unknown(tmp_path, make_figures, capsys):
    results_dir, out_dir = tmp_path / "results", tmp_path / "figures"
    write(results_dir, "decode_benchmark", DECODE_METRICS)
    write(results_dir, "zz_unknown", {"x": 1.0})

    written = make_figures.make_figures(results_dir, out_dir)

    png, pdf = out_dir / "decode_benchmark.png", out_dir / "decode_benchmark.pdf"
    assert written == [png, pdf]
    assert sorted(p.name for p in out_dir.iterdir()) == ["decode_benchmark.pdf", "decode_benchmark.png"]
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5_000
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 600 and height > 200
    out = capsys.readouterr().out
    assert "skip zz_unknown: no figure registered" in out
    assert "decode_benchmark: wrote" in out

    # No timestamps in the files: a rerun gives identical bytes, so unchanged figures give no git diff.
    png_bytes, pdf_bytes = png.read_bytes(), pdf.read_bytes()
    make_figures.make_figures(results_dir, out_dir)
    assert png.read_bytes() == png_bytes and pdf.read_bytes() == pdf_bytes


def test_script_runs_from_the_command_line(tmp_path):
    results_dir, out_dir = tmp_path / "results", tmp_path / "figures"
    write(
        results_dir,
        "decode_benchmark_tiny",
        {"sparse_lm_tokens_per_s": 4.0, "bandwidth_floor_tokens_per_s": 9.0},
    )
    # The repo root on PYTHONPATH stands in for `pip install -e .` when the checkout is not installed.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    env["MPLBACKEND"] = "Agg"
    command = [
        sys.executable,
        "analysis/make_figures.py",
        "--results-dir",
        str(results_dir),
        "--out-dir",
        str(out_dir),
    ]
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True)
    assert (out_dir / "decode_benchmark_tiny.png").stat().st_size > 10_000
    assert (out_dir / "decode_benchmark_tiny.pdf").stat().st_size > 5_000
