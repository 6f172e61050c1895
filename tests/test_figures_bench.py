"""analysis/figures_bench.py: the sparse-FFN benchmark figure, drawn from a bench_ffn_* result."""

import sys

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from sparse_lm.results import load_result, write_result

MACHINE = {"cpu_model": "Test CPU", "cores_logical": 2, "cores_usable": 2, "memory_gib": 8.0, "jax_backend": "cpu"}
FRACTIONS = (0.05, 0.1, 0.25, 0.5)
ROW_ORDER = (0.25, 0.05, 0.5, 0.1)  # the table's rows out of order on purpose
D_MODEL, D_FF, DENSE_MS = 4096, 11008, 2.0
READ_BANDWIDTH, DENSE_GB_PER_S = 30.0, 26.0
IMPLEMENTATIONS = ("xla", "ffi", "pallas")  # in column order
LABELS = {"xla": "XLA gather + dot", "ffi": "C++ twin (jax.ffi)", "pallas": "Pallas"}
TIME_PER_FRACTION = {"xla": 4.0, "ffi": 1.25, "pallas": 8.0}  # sparse time = DENSE_MS * fraction * this
FFI_LABELS = ["16x", "8x", "3.2x", "1.6x"]  # 1 / (1.25 * fraction), at FRACTIONS
TABLE_COLUMNS = ["fraction", "active", "dense_ms",
                 *(f"{impl}{suffix}" for impl in IMPLEMENTATIONS for suffix in ("_ms", "_speedup", "_gb_per_s")),
                 "floor_speedup"]


def sparse_ms(impl, fraction):
    return DENSE_MS * fraction * TIME_PER_FRACTION[impl]


def gb_per_s(impl, fraction):
    return {"xla": 6.0, "ffi": 20.0, "pallas": 1.0}[impl] + 10 * fraction


def floor_speedup(fraction):
    return 0.999 / fraction


def write_bench(results_dir, name="bench_ffn_llama7b", implementations=IMPLEMENTATIONS, missing_ffi=None):
    """A bench_ffn result; `missing_ffi`: a fraction whose ffi cells are None."""
    columns = ["fraction", "active", "dense_ms",
               *(f"{impl}{suffix}" for impl in implementations for suffix in ("_ms", "_speedup", "_gb_per_s")),
               "floor_speedup"]
    rows = []
    for fraction in ROW_ORDER:
        row = [fraction, round(fraction * D_FF), DENSE_MS]
        for impl in implementations:
            cells = [sparse_ms(impl, fraction), DENSE_MS / sparse_ms(impl, fraction), gb_per_s(impl, fraction)]
            row += [None] * 3 if impl == "ffi" and fraction == missing_ffi else cells
        rows.append([*row, floor_speedup(fraction)])
    metrics = {"shape": "llama7b", "d_model": D_MODEL, "d_ff": D_FF, "activation": "swiglu",
               "read_bandwidth_gb_per_s": READ_BANDWIDTH, "huge_page_bytes": 0, "dense_ms": DENSE_MS,
               "dense_floor_ms": 1.8, "dense_gb_per_s": DENSE_GB_PER_S, "speedup_implementation": "ffi"}
    for fraction in FRACTIONS:
        metrics[f"speedup_vs_dense_{fraction}"] = DENSE_MS / sparse_ms("ffi", fraction)
        metrics[f"floor_speedup_{fraction}"] = floor_speedup(fraction)
    table = {"title": "Time per FFN layer and speedup by active fraction", "columns": columns, "rows": rows}
    path = write_result(name, metrics, command="python experiments/bench_ffn.py shape=llama7b",
                        title="Sparse FFN against dense: llama7b layer (d 4096, d_ff 11008)", tables=[table],
                        results_dir=results_dir, machine=MACHINE)
    return load_result(path)


@pytest.fixture(scope="module")
def bench(make_figures):
    return make_figures.figures_bench


def horizontal_line(ax, y):
    """The one horizontal line drawn across the whole axes at height `y`."""
    (line,) = [line for line in ax.get_lines()
               if list(line.get_ydata()) == [y, y] and list(line.get_xdata()) == [0, 1]]
    return line


def legend_texts(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_registry_maps_bench_ffn_results(make_figures, bench):
    for name in ("bench_ffn_llama7b", "bench_ffn_smollm2", "bench_ffn", "bench_ffn-avx512"):
        assert make_figures.find_figure(name) is bench.draw_bench_ffn
    for name in ("bench_ffnx", "bench_decode", "bench"):
        assert make_figures.find_figure(name) is None
    # The figures registered before still resolve as they did (scratch_ffn_sweep holds "ffn" too).
    train, predictors = make_figures.figures_train, make_figures.figures_predictors
    study = make_figures.figures_predictor_study
    expected = {
        "decode_benchmark": make_figures.draw_decode_benchmark,
        "profile_smollm2_topk10": make_figures.draw_profile,
        "teal_smollm2": make_figures.draw_teal,
        "scratch_ffn_sweep": train.draw_scratch_ffn_sweep,
        "relufy_family_sweep": train.draw_scratch_ffn_sweep,  # every collect_sweep record: the sweep figure
        "relufy_smollm2_drelu": train.draw_relufy,
        "predictors_smollm2_drelu": predictors.draw_predictors,
        "predictor_scaling_smollm2_drelu": study.draw_predictor_scaling,
        "predictor_sweep_scratch": study.draw_predictor_sweep,
        "perplexity_web": None,
    }
    assert {name: make_figures.find_figure(name) for name in expected} == expected
    registered = set(sys.modules[make_figures.find_figure.__module__].FIGURES)
    assert registered == {"bench_ffn", "bench_sparse", "decode_benchmark", "profile", "teal", "scratch_ffn_sweep",
                          "relufy", "predictors", "predictor_scaling", "predictor_sweep", "cost_model_validation",
                          "place_sweep", "bench_disk_tier", "frontier", "relufy_recipe_sweep", "relufy_lr_sweep",
                          "relufy_family_sweep"}


def test_implementations_from_column_names(bench):
    assert bench.implementations(TABLE_COLUMNS) == list(IMPLEMENTATIONS)
    assert bench.implementations(["fraction", "dense_ms", "ffi_ms", "ffi_speedup", "ffi_gb_per_s"]) == ["ffi"]
    # all three columns are needed: dense_ms alone, or a run without its bandwidth, is no implementation
    assert bench.implementations(["dense_ms", "xla_ms", "xla_speedup", "floor_speedup"]) == []


def test_speedup_panel(tmp_path, bench):
    fig = bench.bench_ffn_figure(write_bench(tmp_path))
    speedup_ax, bandwidth_ax = fig.axes

    # One line with markers per implementation (rows sorted by fraction), then the floor and the dense line at 1.
    *impl_lines, floor, dense = speedup_ax.get_lines()
    assert [line.get_label() for line in impl_lines] == [LABELS[impl] for impl in IMPLEMENTATIONS]
    for impl, line in zip(IMPLEMENTATIONS, impl_lines, strict=True):
        np.testing.assert_allclose(line.get_xdata(), FRACTIONS)
        np.testing.assert_allclose(line.get_ydata(), [1 / (f * TIME_PER_FRACTION[impl]) for f in FRACTIONS])
        assert line.get_marker() not in (None, "None", "") and line.get_linestyle() == "-"
    assert len({line.get_marker() for line in impl_lines}) == len(IMPLEMENTATIONS)
    assert len({matplotlib.colors.to_hex(line.get_color()) for line in impl_lines}) == len(IMPLEMENTATIONS)
    np.testing.assert_allclose(floor.get_xdata(), FRACTIONS)
    np.testing.assert_allclose(floor.get_ydata(), [floor_speedup(f) for f in FRACTIONS])
    assert floor.get_linestyle() == "--" and floor.get_label() == "bandwidth floor (dense bytes / sparse bytes)"
    assert horizontal_line(speedup_ax, 1) is dense and dense.get_label() == "dense"
    assert legend_texts(speedup_ax) == [*(LABELS[impl] for impl in IMPLEMENTATIONS),
                                        "bandwidth floor (dense bytes / sparse bytes)", "dense"]

    # The C++ twin's speedups written at its points, in its colour.
    ffi_line = impl_lines[IMPLEMENTATIONS.index("ffi")]
    assert [text.get_text() for text in speedup_ax.texts] == FFI_LABELS
    np.testing.assert_allclose([text.xy for text in speedup_ax.texts],
                               np.column_stack([ffi_line.get_xdata(), ffi_line.get_ydata()]))
    assert {text.get_color() for text in speedup_ax.texts} == {ffi_line.get_color()}

    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        np.testing.assert_allclose(ax.get_xticks(), FRACTIONS)
        assert [label.get_text() for label in ax.get_xticklabels()] == ["5%", "10%", "25%", "50%"]
    assert speedup_ax.get_yscale() == "log"
    assert speedup_ax.get_title().startswith("(a) speedup over dense")
    assert fig.get_suptitle() == "Sparse FFN against dense: llama7b layer (d 4096, d_ff 11008), one token, f32"
    assert "Test CPU" in fig.get_supxlabel()


def test_bandwidth_panel(tmp_path, bench):
    fig = bench.bench_ffn_figure(write_bench(tmp_path))
    speedup_ax, bandwidth_ax = fig.axes

    *impl_lines, read, dense = bandwidth_ax.get_lines()
    for impl, line, speedup_line in zip(IMPLEMENTATIONS, impl_lines, speedup_ax.get_lines()[:3], strict=True):
        np.testing.assert_allclose(line.get_xdata(), FRACTIONS)
        np.testing.assert_allclose(line.get_ydata(), [gb_per_s(impl, f) for f in FRACTIONS])
        assert line.get_label() == LABELS[impl]
        # an implementation looks the same in both panels
        assert (line.get_color(), line.get_marker()) == (speedup_line.get_color(), speedup_line.get_marker())
    assert horizontal_line(bandwidth_ax, READ_BANDWIDTH) is read
    assert read.get_label() == "read bandwidth measured in the same run" and read.get_linestyle() == "--"
    assert horizontal_line(bandwidth_ax, DENSE_GB_PER_S) is dense
    assert dense.get_label() == "dense FFN" and dense.get_linestyle() == ":"
    assert legend_texts(bandwidth_ax) == [*(LABELS[impl] for impl in IMPLEMENTATIONS),
                                          "read bandwidth measured in the same run", "dense FFN"]
    highest = max(READ_BANDWIDTH, *(gb_per_s(impl, 0.5) for impl in IMPLEMENTATIONS))
    np.testing.assert_allclose(bandwidth_ax.get_ylim(), (0, bench.HEADROOM * highest))
    assert bandwidth_ax.get_yscale() == "linear" and len(bandwidth_ax.texts) == 0
    assert bandwidth_ax.get_title() == "(b) achieved bandwidth"


def test_missing_cells_leave_gaps(tmp_path, bench):
    fig = bench.bench_ffn_figure(write_bench(tmp_path, implementations=("ffi",), missing_ffi=0.25))
    speedup_ax, bandwidth_ax = fig.axes
    ffi_speedup, ffi_bandwidth = speedup_ax.get_lines()[0], bandwidth_ax.get_lines()[0]
    np.testing.assert_allclose(ffi_speedup.get_ydata(), [16, 8, np.nan, 1.6])
    np.testing.assert_allclose(ffi_bandwidth.get_ydata(), [20.5, 21, np.nan, 25])
    assert [text.get_text() for text in speedup_ax.texts] == ["16x", "8x", "1.6x"]
    assert legend_texts(speedup_ax)[0] == "C++ twin (jax.ffi)"


def test_without_ffi_nothing_is_annotated(tmp_path, bench):
    fig = bench.bench_ffn_figure(write_bench(tmp_path, implementations=("xla",)))
    assert len(fig.axes[0].texts) == 0
    assert legend_texts(fig.axes[1])[0] == "XLA gather + dot"


def test_malformed_tables_are_named(tmp_path, bench):
    result = write_bench(tmp_path)
    result["tables"][0]["title"] = "Something else"
    with pytest.raises(KeyError, match="'bench_ffn_llama7b' has no table titled 'Time per FFN layer"):
        bench.bench_ffn_figure(result)
    result = write_bench(tmp_path)
    result["tables"][0]["columns"][-1] = "floor"
    with pytest.raises(ValueError, match=r"the FFN timing table lacks columns \['floor_speedup'\]"):
        bench.bench_ffn_figure(result)
    result = write_bench(tmp_path, implementations=())
    with pytest.raises(ValueError, match="'bench_ffn_llama7b': the FFN timing table has no implementation columns"):
        bench.bench_ffn_figure(result)


def test_draws_one_figure_per_result(tmp_path, make_figures):
    results_dir, out_dir = tmp_path / "results", tmp_path / "figures"
    for name in ("bench_ffn_llama7b", "bench_ffn_smollm2"):
        write_bench(results_dir, name)

    written = make_figures.make_figures(results_dir, out_dir)

    stems = ["bench_ffn_llama7b", "bench_ffn_smollm2"]
    assert written == [out_dir / f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")]
    for stem in stems:
        png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
        assert png.read_bytes().startswith(b"\x89PNG") and pdf.read_bytes().startswith(b"%PDF")
        height, width, _ = matplotlib.image.imread(png).shape
        assert width > 1500 and height > 600
