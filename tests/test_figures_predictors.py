"""analysis/figures_predictors.py: the activation-predictor figure, drawn from a predictors_* result."""

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from sparse_lm.results import load_result, write_result

MACHINE = {"cpu_model": "Test CPU", "cores_logical": 2, "cores_usable": 2, "memory_gib": 8.0, "jax_backend": "cpu"}
RANKS = (8, 16, 32)
CHOSEN = (8, 32, 16, 32)  # rank per layer
TRUE_ACTIVE = (0.5, 0.3, 0.2, 0.1)
OVERHEAD_PER_RANK = 0.004  # predictor parameters / FFN parameters per unit of rank
# target_recall, recall_mean, predicted_active_mean, perplexity_predicted
CURVE = [[0.9, 0.89, 0.40, 31.0], [0.95, 0.948, 0.50, 30.2], [0.99, 0.987, 0.70, 30.05]]
DENSE, UNIFORM_PPL, UNIFORM_OVER_TRUE = 30.0, 30.4, 2.0


def budget_recall(rank: int, layer: int) -> float:
    return 0.6 + 0.1 * np.log2(rank / 8) - 0.01 * layer


def write_predictors(results_dir, name="predictors_smollm2", with_candidates=True, per_layer=True):
    layers = range(len(CHOSEN))
    rows = [[layer, CHOSEN[layer], 0.95, 0.5 + 0.1 * layer, 2 * TRUE_ACTIVE[layer], TRUE_ACTIVE[layer],
             budget_recall(CHOSEN[layer], layer), 0.02, OVERHEAD_PER_RANK * CHOSEN[layer]] for layer in layers]
    tables = [
        {"title": "Per layer",
         "columns": ["layer", "rank", "recall", "precision", "predicted_active", "true_active", "budget_recall",
                     "missed_mass", "overhead"],
         "rows": rows},
        {"title": f"Perplexity against predicted sparsity (dense {DENSE:.3f})",
         "columns": ["target_recall", "recall_mean", "predicted_active_mean", "perplexity_predicted"],
         "rows": CURVE},
    ][0 if per_layer else 1:]
    metrics = {"model": "SmolLM2-135M", "activation": "relu", "firing_rule": "positive", "target_recall": 0.95,
               "true_active_mean": float(np.mean(TRUE_ACTIVE)), "perplexity_dense": DENSE,
               "perplexity_predicted": 30.2, "predictor_param_share": 0.0834}
    series = None
    if with_candidates:
        compare = ["sizing", "predictor_params", "recall_mean", "predicted_over_true", "perplexity_predicted"]
        tables.append({"title": "Adaptive ranks vs one uniform rank (24) of equal total size", "columns": compare,
                       "rows": [["adaptive", 1000, 0.948, 0.5 / np.mean(TRUE_ACTIVE), 30.2],
                                ["uniform", 1000, 0.947, UNIFORM_OVER_TRUE, UNIFORM_PPL]]})
        series = {"candidates": {
            "columns": ["rank", "layer", "recall", "predicted_over_true", "budget_recall"],
            "rows": [[rank, layer, 0.95, 1.5, budget_recall(rank, layer)] for rank in RANKS for layer in layers],
        }}
        metrics.update(uniform_rank=24, uniform_perplexity_predicted=UNIFORM_PPL)
    path = write_result(name, metrics, command="python -m experiments.predictors", title=f"Predictors: {name}",
                        tables=tables, series=series, results_dir=results_dir, machine=MACHINE)
    return load_result(path)


@pytest.fixture(scope="module")
def figures_predictors(make_figures):
    return make_figures.figures_predictors


def depth_color(layer):
    return matplotlib.colormaps["viridis"](layer / (len(CHOSEN) - 1))


def reference_line(ax, y):
    """The horizontal lines drawn across the whole axes at height `y`."""
    return [line for line in ax.get_lines() if list(line.get_ydata()) == [y, y] and list(line.get_xdata()) == [0, 1]]


def test_registry_matches_predictor_results(make_figures, figures_predictors):
    for name in ("predictors", "predictors_smollm2", "predictors-tiny"):
        assert make_figures.find_figure(name) is figures_predictors.draw_predictors
    assert make_figures.find_figure("predictorsx") is None


def test_figure_with_candidate_ranks(tmp_path, figures_predictors):
    result = write_predictors(tmp_path)
    fig = figures_predictors.predictors_figure(result)
    recall_ax, size_ax, ppl_ax, colorbar_ax = fig.axes

    # (a) one budget-recall line per layer over the candidate ranks, coloured by depth; dots at the chosen ranks.
    lines = recall_ax.get_lines()
    assert len(lines) == len(CHOSEN)
    for layer, line in enumerate(lines):
        np.testing.assert_allclose(line.get_xdata(), RANKS)
        np.testing.assert_allclose(line.get_ydata(), [budget_recall(rank, layer) for rank in RANKS])
        np.testing.assert_allclose(matplotlib.colors.to_rgba(line.get_color()), depth_color(layer))
    (chosen,) = recall_ax.collections
    np.testing.assert_allclose(chosen.get_offsets(), [(r, budget_recall(r, i)) for i, r in enumerate(CHOSEN)])
    np.testing.assert_allclose(chosen.get_facecolors(), [depth_color(layer) for layer in range(len(CHOSEN))])
    assert recall_ax.get_xscale() == "log" and recall_ax.xaxis.get_transform().base == 2
    assert [tick.get_text() for tick in recall_ax.get_xticklabels()] == ["8", "16", "32"]
    assert "layer" in colorbar_ax.get_ylabel()

    # (b) predictor share of the FFN against layer sparsity, the extremes named, the 10% budget line.
    (sizes,) = size_ax.collections
    expected = [(1 - true, OVERHEAD_PER_RANK * rank) for true, rank in zip(TRUE_ACTIVE, CHOSEN, strict=True)]
    np.testing.assert_allclose(sizes.get_offsets(), expected)
    assert len(reference_line(size_ax, 0.1)) == 1
    # first and last layers, least and most sparse (L0, L3), smallest and first largest predictor (L0, L1)
    assert sorted(text.get_text() for text in size_ax.texts) == ["10% overhead budget", "L0", "L1", "L3"]
    assert size_ax.get_ylim()[0] == 0

    # (c) perplexity against predicted sparsity per target recall; uniform ranks placed by
    # predicted_over_true * true_active_mean; the dense model as a reference line.
    curve = ppl_ax.get_lines()[0]
    np.testing.assert_allclose(curve.get_xdata(), [1 - row[2] for row in CURVE])
    np.testing.assert_allclose(curve.get_ydata(), [row[3] for row in CURVE])
    (uniform,) = [line for line in ppl_ax.get_lines() if line.get_marker() == "s"]
    np.testing.assert_allclose([uniform.get_xdata()[0], uniform.get_ydata()[0]],
                               [1 - UNIFORM_OVER_TRUE * np.mean(TRUE_ACTIVE), UNIFORM_PPL])
    assert uniform.get_label() == "uniform rank 24, target recall 0.95"
    assert len(reference_line(ppl_ax, DENSE)) == 1
    assert sorted(text.get_text() for text in ppl_ax.texts) == ["0.9", "0.95", "0.99", "dense model: 30"]

    assert fig.get_suptitle() == ("Activation predictors: SmolLM2-135M (relu FFN, positive firing rule); "
                                  "predictors add 8.3% to the model's parameters")


def test_uniform_predicted_active(tmp_path, figures_predictors):
    result = write_predictors(tmp_path)
    assert figures_predictors.uniform_predicted_active(result) == pytest.approx(UNIFORM_OVER_TRUE * 0.275)
    assert figures_predictors.uniform_predicted_active(write_predictors(tmp_path, with_candidates=False)) is None


def test_figure_without_candidate_ranks(tmp_path, figures_predictors):
    result = write_predictors(tmp_path, with_candidates=False)
    fig = figures_predictors.predictors_figure(result)
    recall_ax, size_ax, ppl_ax, colorbar_ax = fig.axes

    # (a) recall and precision bars per layer at the calibrated threshold, the target recall as a line.
    recall_bars, precision_bars = recall_ax.containers
    np.testing.assert_allclose([bar.get_height() for bar in recall_bars], [0.95] * len(CHOSEN))
    np.testing.assert_allclose([bar.get_height() for bar in precision_bars], [0.5, 0.6, 0.7, 0.8])
    np.testing.assert_allclose([bar.get_x() + bar.get_width() / 2 for bar in recall_bars], [-0.2, 0.8, 1.8, 2.8])
    assert len(reference_line(recall_ax, 0.95)) == 1
    # The depth scale moves beside (b), whose points still carry it.
    fig.draw_without_rendering()  # constrained layout places the axes when drawing
    assert "layer" in colorbar_ax.get_ylabel()
    assert colorbar_ax.get_position().x0 > size_ax.get_position().x1 > recall_ax.get_position().x1
    assert len(size_ax.collections[0].get_offsets()) == len(CHOSEN)
    # (c) no uniform point without adaptive sizing.
    assert [line.get_marker() for line in ppl_ax.get_lines()] == ["o", "None"]


def test_missing_tables_are_named(tmp_path, figures_predictors):
    with pytest.raises(ValueError, match="'predictors_smollm2' has no per-layer table"):
        figures_predictors.predictors_figure(write_predictors(tmp_path, per_layer=False))
    no_curve = write_predictors(tmp_path)
    del no_curve["tables"][1]
    with pytest.raises(ValueError, match="'predictors_smollm2' has no perplexity-against-sparsity table"):
        figures_predictors.predictors_figure(no_curve)
    bad_series = write_predictors(tmp_path)
    bad_series["series"]["candidates"]["columns"][4] = "recall_at_budget"
    with pytest.raises(ValueError, match=r"'candidates' series lacks columns \['budget_recall'\]"):
        figures_predictors.predictors_figure(bad_series)


def test_draws_predictor_figures(tmp_path, make_figures):
    results_dir, out_dir = tmp_path / "results", tmp_path / "figures"
    write_predictors(results_dir)
    write_predictors(results_dir, name="predictors_no_sizing", with_candidates=False)

    written = make_figures.make_figures(results_dir, out_dir)

    stems = ["predictors_no_sizing", "predictors_smollm2"]
    assert written == [out_dir / f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")]
    for stem in stems:
        png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5_000
        height, width, _ = matplotlib.image.imread(png).shape
        assert width > 1500 and height > 500
