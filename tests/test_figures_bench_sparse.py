"""analysis/figures_bench.py: the sparse decode figure, drawn from a bench_sparse_* result."""

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from sparse_lm.results import load_result, write_result

MACHINE = {"cpu_model": "Test CPU", "cores_logical": 2, "cores_usable": 2, "memory_gib": 8.0, "jax_backend": "cpu"}
DENSE, SPARSE, LLAMA_CPP, INTERLEAVED, PAPER = 20.0, 30.0, 25.0, 24.5, 22.0  # tokens/s
DENSE_RUNS, SPARSE_RUNS, LLAMA_CPP_RUNS = (19.5, 20.0, 21.0), (31.5, 29.0, 30.0), (24.0, 25.0, 26.0)
DENSE_FLOOR, SPARSE_FLOOR = 40.0, 60.0
PPL_DENSE, PPL_SPARSE = 50.0, 52.5  # +5%; the 2% budget is at 51
COMMAND = "python experiments/bench_decode.py experiment=bench_sparse_smollm2_drelu"
LLAMA_CPP_KEYS = ("llama_cpp_tokens_per_s", "llama_cpp_tokens_per_s_runs", "tokens_per_s_llama_cpp_interleaved",
                  "llama_cpp_f32_paper_tokens_per_s")


def runs_text(runs):
    return ", ".join(f"{run:.2f}" for run in runs)


def write_sparse(results_dir, name="bench_sparse_smollm2_drelu", drop=(), **overrides):
    """A bench_sparse result like bench_decode's, without the metrics in `drop`, with `overrides`."""
    metrics = {
        "model": "smollm2_135m", "tokens_per_s_dense": DENSE, "tokens_per_s_sparse": SPARSE,
        "sparse_speedup": SPARSE / DENSE, "perplexity_dense": PPL_DENSE, "perplexity_sparse": PPL_SPARSE,
        "perplexity_change": PPL_SPARSE / PPL_DENSE - 1, "predicted_active_mean": 0.25,
        "capacity_mean_fraction": 0.5, "dense_floor_tokens_per_s": DENSE_FLOOR,
        "sparse_floor_tokens_per_s": SPARSE_FLOOR, "read_bandwidth_gb_per_s": 30.0, "implementation": "auto",
        "tokens_per_s_dense_runs": runs_text(DENSE_RUNS), "tokens_per_s_sparse_runs": runs_text(SPARSE_RUNS),
        "greedy_tokens_equal_dense": 100, "new_tokens": 128, "perplexity_tokens": 16384,
        "llama_cpp_f32_paper_tokens_per_s": PAPER, "llama_cpp_tokens_per_s": LLAMA_CPP,
        "llama_cpp_tokens_per_s_runs": runs_text(LLAMA_CPP_RUNS), "llama_cpp_threads": 2,
        "tokens_per_s_llama_cpp_interleaved": INTERLEAVED, "sparse_over_llama_cpp": SPARSE / INTERLEAVED,
    }
    metrics = {key: value for key, value in metrics.items() if key not in drop} | overrides
    path = write_result(name, metrics, command=COMMAND,
                        title="Sparse decode engine against dense: smollm2_135m (f32, batch 1, CPU)",
                        results_dir=results_dir, machine=MACHINE)
    return load_result(path)


@pytest.fixture(scope="module")
def bench(make_figures):
    return make_figures.figures_bench


def texts(ax):
    return [text.get_text() for text in ax.texts]


def text_at(ax, string):
    """The data point the one text `string` of `ax` is written at."""
    (text,) = [text for text in ax.texts if text.get_text() == string]
    return tuple(text.xy)


def styled_lines(ax, linestyle):
    return [line for line in ax.get_lines() if line.get_linestyle() == linestyle]


def test_registry_maps_bench_sparse_results(make_figures, bench):
    for name in ("bench_sparse_smollm2_drelu", "bench_sparse", "bench_sparse-llama7b"):
        assert make_figures.find_figure(name) is bench.draw_bench_sparse
    for name in ("bench_ffn_llama7b", "bench_ffn_smollm2", "bench_ffn"):
        assert make_figures.find_figure(name) is bench.draw_bench_ffn
    for name in ("bench_sparsex", "bench_sparsity", "bench_decode", "bench"):
        assert make_figures.find_figure(name) is None


def test_decode_bars_with_runs(tmp_path, bench):
    fig = bench.bench_sparse_figure(write_sparse(tmp_path))
    decode_ax, _ = fig.axes

    # Three bars left to right: dense, the sparse engine, llama.cpp measured in the run, each labelled with its value.
    np.testing.assert_allclose([bar.get_height() for bar in decode_ax.patches], [DENSE, SPARSE, LLAMA_CPP])
    np.testing.assert_allclose([bar.get_x() + bar.get_width() / 2 for bar in decode_ax.patches], [0, 1, 2])
    assert [label.get_text() for label in decode_ax.get_xticklabels()] == [
        "dense\n(sparse_lm)", "sparse engine\n(sparse_lm)", "llama.cpp F32\n(this run)"]
    assert len({matplotlib.colors.to_hex(bar.get_facecolor()) for bar in decode_ax.patches}) == 3
    assert texts(decode_ax)[:3] == ["20", "30", "25"]

    # Each bar's runs as dots side by side within it, in the order run.
    dots = styled_lines(decode_ax, "None")
    assert len(dots) == 3 and all(line.get_marker() == "o" for line in dots)
    for x, line, bar_runs in zip((0, 1, 2), dots, (DENSE_RUNS, SPARSE_RUNS, LLAMA_CPP_RUNS), strict=True):
        np.testing.assert_allclose(line.get_ydata(), bar_runs)
        xs = np.asarray(line.get_xdata())
        assert np.all(np.diff(xs) > 0) and np.all(np.abs(xs - x) < bench.BAR_WIDTH / 2)
        np.testing.assert_allclose(xs.mean(), x)
    assert [line.get_label() for line in dots] == ["individual runs (bar: median)", "_nolegend_", "_nolegend_"]


def test_decode_floors_speedup_and_paper(tmp_path, bench):
    fig = bench.bench_sparse_figure(write_sparse(tmp_path))
    decode_ax, _ = fig.axes

    # The bandwidth floors: dashed marks across the dense and the sparse bar, each labelled with its value.
    floors = styled_lines(decode_ax, "--")
    np.testing.assert_allclose([line.get_ydata() for line in floors], [[DENSE_FLOOR] * 2, [SPARSE_FLOOR] * 2])
    np.testing.assert_allclose([line.get_xdata() for line in floors], [[-0.3, 0.3], [0.7, 1.3]])
    assert text_at(decode_ax, "bandwidth floor 40") == (0, DENSE_FLOOR)
    assert text_at(decode_ax, "bandwidth floor 60") == (1, SPARSE_FLOOR)

    # llama.cpp's number recorded in ANCHORS.md as a dotted mark across its bar.
    (paper,) = styled_lines(decode_ax, ":")
    np.testing.assert_allclose(paper.get_ydata(), [PAPER] * 2)
    np.testing.assert_allclose(paper.get_xdata(), [1.7, 2.3])

    # The speedup written between the dense and sparse bars, over an arrow from one to the other above their runs.
    (arrow,) = [text for text in decode_ax.texts if text.get_text() == "" and text.arrow_patch is not None]
    arrow_y = 1.08 * max(SPARSE_RUNS)
    np.testing.assert_allclose([arrow.xyann, arrow.xy], [(0, arrow_y), (1, arrow_y)])
    assert text_at(decode_ax, "sparse / dense: 1.5x") == pytest.approx((0.5, arrow_y))

    assert [text.get_text() for text in decode_ax.get_legend().get_texts()] == [
        "individual runs (bar: median)", "llama.cpp F32 recorded in ANCHORS.md (22)"]
    np.testing.assert_allclose(decode_ax.get_ylim(), (0, bench.BAR_HEADROOM * SPARSE_FLOOR))
    assert decode_ax.get_title() == "(a) decode speed"


def test_perplexity_panel(tmp_path, bench):
    fig = bench.bench_sparse_figure(write_sparse(tmp_path))
    decode_ax, ppl_ax = fig.axes

    np.testing.assert_allclose([bar.get_height() for bar in ppl_ax.patches], [PPL_DENSE, PPL_SPARSE])
    assert [label.get_text() for label in ppl_ax.get_xticklabels()] == ["dense", "sparse engine"]
    # dense and sparse look the same in both panels
    assert ([bar.get_facecolor() for bar in ppl_ax.patches]
            == [bar.get_facecolor() for bar in decode_ax.patches[:2]])
    assert texts(ppl_ax)[:2] == ["50.00", "52.50"]
    assert text_at(ppl_ax, "+5.0% vs dense") == (1, PPL_SPARSE)

    # The 2% budget: a dashed line across the panel at dense x 1.02, named over the dense bar.
    (budget,) = styled_lines(ppl_ax, "--")
    np.testing.assert_allclose(budget.get_ydata(), [1.02 * PPL_DENSE] * 2)
    np.testing.assert_allclose(budget.get_xdata(), [0, 1])
    assert text_at(ppl_ax, "2% budget") == pytest.approx((0, 1.02 * PPL_DENSE))
    np.testing.assert_allclose(ppl_ax.get_ylim(), (0, bench.BAR_HEADROOM * PPL_SPARSE))
    assert ppl_ax.get_title() == "(b) perplexity on 16.4k validation tokens"


def test_perplexity_panel_shows_the_original_model_first(tmp_path, bench):
    fig = bench.bench_sparse_figure(write_sparse(tmp_path, perplexity_original=20.0, original_activation="swiglu"))
    _, ppl_ax = fig.axes
    np.testing.assert_allclose([bar.get_height() for bar in ppl_ax.patches], [20.0, PPL_DENSE, PPL_SPARSE])
    assert [label.get_text() for label in ppl_ax.get_xticklabels()] == [
        "original (swiglu)", "ReLU-fied dense", "sparse engine"]
    assert text_at(ppl_ax, "+150.0% vs original") == (1, PPL_DENSE)
    assert text_at(ppl_ax, "+5.0% vs dense") == (2, PPL_SPARSE)
    assert text_at(ppl_ax, "2% budget") == pytest.approx((1, 1.02 * PPL_DENSE))


def test_titles(tmp_path, bench):
    fig = bench.bench_sparse_figure(write_sparse(tmp_path))
    assert fig.get_suptitle() == ("Sparse decode engine against dense: smollm2_135m, batch 1, f32\n"
                                  "predicted active share of FFN neurons: 25.0% (mean over layers and tokens)")
    assert fig.get_supxlabel().startswith("Test CPU, 2 cores, 8.0 GiB")
    fig = bench.bench_sparse_figure(write_sparse(tmp_path, drop=("predicted_active_mean", "model")))
    assert fig.get_suptitle() == "Sparse decode engine against dense: bench_sparse_smollm2_drelu, batch 1, f32"


def test_without_llama_cpp_two_bars(tmp_path, bench):
    # bench_decode always records the paper's number; without a llama.cpp bar it has nothing to mark
    fig = bench.bench_sparse_figure(write_sparse(tmp_path, drop=LLAMA_CPP_KEYS[:3]))
    decode_ax, _ = fig.axes
    np.testing.assert_allclose([bar.get_height() for bar in decode_ax.patches], [DENSE, SPARSE])
    assert [label.get_text() for label in decode_ax.get_xticklabels()] == [
        "dense\n(sparse_lm)", "sparse engine\n(sparse_lm)"]
    assert len(styled_lines(decode_ax, "None")) == 2 and styled_lines(decode_ax, ":") == []
    assert [text.get_text() for text in decode_ax.get_legend().get_texts()] == ["individual runs (bar: median)"]
    assert "sparse / dense: 1.5x" in texts(decode_ax)


def test_ceiling_bar_between_sparse_and_llama_cpp(tmp_path, bench):
    fig = bench.bench_sparse_figure(write_sparse(tmp_path, tokens_per_s_ffn_free=55.0))
    decode_ax, _ = fig.axes
    np.testing.assert_allclose([bar.get_height() for bar in decode_ax.patches], [DENSE, SPARSE, 55.0, LLAMA_CPP])
    assert [label.get_text() for label in decode_ax.get_xticklabels()][2] == "no FFN at all\n(ceiling)"
    assert len(styled_lines(decode_ax, ":")) == 1  # the paper's llama.cpp mark stays on the llama.cpp bar
    without_llama = bench.bench_sparse_figure(write_sparse(tmp_path, drop=LLAMA_CPP_KEYS, tokens_per_s_ffn_free=55.0))
    assert styled_lines(without_llama.axes[0], ":") == []


def test_llama_cpp_interleaved_when_measured_only_there(tmp_path, bench):
    # only the median over the repeats interleaved with dense and sparse: a bar without dots
    fig = bench.bench_sparse_figure(write_sparse(tmp_path, drop=LLAMA_CPP_KEYS[:2]))
    decode_ax, _ = fig.axes
    np.testing.assert_allclose([bar.get_height() for bar in decode_ax.patches], [DENSE, SPARSE, INTERLEAVED])
    assert len(styled_lines(decode_ax, "None")) == 2
    assert texts(decode_ax)[2] == "24.5"


def test_missing_runs_and_floors_are_left_out(tmp_path, bench):
    result = write_sparse(tmp_path, drop=("tokens_per_s_dense_runs", "tokens_per_s_sparse_runs",
                                          "llama_cpp_tokens_per_s_runs", "dense_floor_tokens_per_s",
                                          "sparse_floor_tokens_per_s", "perplexity_tokens"))
    fig = bench.bench_sparse_figure(result)
    decode_ax, ppl_ax = fig.axes
    assert styled_lines(decode_ax, "None") == [] and styled_lines(decode_ax, "--") == []
    assert not any(text.startswith("bandwidth floor") for text in texts(decode_ax))
    # without runs the arrow sits just over the taller bar
    assert text_at(decode_ax, "sparse / dense: 1.5x") == pytest.approx((0.5, 1.08 * SPARSE))
    assert ppl_ax.get_title() == "(b) perplexity"


def test_malformed_results_are_named(tmp_path, bench):
    with pytest.raises(ValueError, match=r"'bench_sparse_smollm2_drelu': metrics \['tokens_per_s_sparse'\] are"):
        bench.bench_sparse_figure(write_sparse(tmp_path, drop=("tokens_per_s_sparse",)))
    with pytest.raises(ValueError, match=r"metrics \['perplexity_dense'\] are missing or not finite"):
        bench.bench_sparse_figure(write_sparse(tmp_path, perplexity_dense=None))
    with pytest.raises(ValueError, match="tokens_per_s_dense_runs='20.1; 19.9' is not a comma-separated list"):
        bench.bench_sparse_figure(write_sparse(tmp_path, tokens_per_s_dense_runs="20.1; 19.9"))


def test_draws_one_figure_per_result(tmp_path, make_figures):
    results_dir, out_dir = tmp_path / "results", tmp_path / "figures"
    write_sparse(results_dir, "bench_sparse_smollm2_drelu")
    write_sparse(results_dir, "bench_sparse_smollm2_relu", drop=LLAMA_CPP_KEYS)

    written = make_figures.make_figures(results_dir, out_dir)

    stems = ["bench_sparse_smollm2_drelu", "bench_sparse_smollm2_relu"]
    assert written == [out_dir / f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")]
    for stem in stems:
        png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
        assert png.read_bytes().startswith(b"\x89PNG") and pdf.read_bytes().startswith(b"%PDF")
        height, width, _ = matplotlib.image.imread(png).shape
        assert width > 1500 and height > 700
