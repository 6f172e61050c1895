"""analysis/figures_predictor_study.py: the predictor-scaling and predictor-sweep figures, drawn from their results."""

import itertools
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest
from matplotlib.ticker import PercentFormatter

from sparse_lm.results import load_result, write_result

MACHINE = {"cpu_model": "Test CPU", "cores_logical": 2, "cores_usable": 2, "memory_gib": 8.0, "jax_backend": "cpu"}
LAYERS, PAIRS, RANKS, EPOCHS = (2, 14, 27), (1024, 4096), (32, 96), (1, 2, 4)
PROJECTION_RANKS = (16, 32, 64)
OVERHEAD_SLOPE, OVERHEAD_INTERCEPT = 0.0008, 0.0006  # predictor FLOPs / FFN FLOPs = slope * rank + intercept
RANK_AT_10_PERCENT = (0.10 - OVERHEAD_INTERCEPT) / OVERHEAD_SLOPE


def val_ratio(layer, pairs, rank, epoch):
    return 1.1 + 0.01 * layer + 16 / rank + 0.5 / epoch + 256 / pairs


def train_ratio(layer, pairs, rank, epoch):
    return val_ratio(layer, pairs, rank, epoch) - 0.05 * epoch * 1024 / pairs


def projection_ratio(layer, rank):
    return 1 + 32 / rank + 0.02 * layer


def write_scaling(results_dir, name="predictor_scaling_smollm2_drelu", with_projection=True):
    trained = [[layer, pairs, rank, OVERHEAD_SLOPE * rank + OVERHEAD_INTERCEPT, epoch, epoch * pairs // 1024,
                0.1 / epoch, 0.95, val_ratio(layer, pairs, rank, epoch), 0.9, train_ratio(layer, pairs, rank, epoch),
                0.92]
               for layer, pairs, rank, epoch in itertools.product(LAYERS, PAIRS, RANKS, EPOCHS)]
    series = {"trained": {
        "columns": ["layer", "train_pairs", "rank", "overhead", "epoch", "steps", "loss", "val_recall",
                    "val_predicted_over_true", "val_budget_recall", "train_predicted_over_true",
                    "train_budget_recall"],
        "rows": trained,
    }}
    if with_projection:
        series["projection"] = {
            "columns": ["layer", "rank", "predictor_rank", "predicted_over_true", "budget_recall"],
            "rows": [[layer, rank, 2 * rank, projection_ratio(layer, rank), 0.9]
                     for layer in LAYERS for rank in reversed(PROJECTION_RANKS)],  # out of order on purpose
        }
    metrics = {"model": "SmolLM2-135M", "activation": "drelu", "firing_rule": "nonzero", "target_recall": 0.95,
               "layer2_rank32_val_over_true": 1.5}
    path = write_result(name, metrics, command="python -m experiments.predictor_scaling", title="Predictor scaling",
                        series=series, results_dir=results_dir, machine=MACHINE)
    return load_result(path)


# firing, hidden, loss, predicted_over_true, budget_recall_mean, perplexity_change
SWEEP = [
    ["nonzero", "relu", "bce", 1.30, 0.942, -0.0019],
    ["topk@0.9", "relu", "bce", 1.31, 0.934, -0.0025],
    ["nonzero", "none", "bce", 1.28, 0.947, -0.0009],
    ["topk@0.9", "none", "bce", 1.28, 0.945, 0.0014],
    ["nonzero", "relu", "focal(gamma 2.0)", 1.55, 0.898, -0.0018],
    ["topk@0.9", "relu", "focal(gamma 2.0)", 1.46, 0.909, -0.0017],
]
DESIGNS = {("relu", "bce"): "relu hidden + bce", ("none", "bce"): "linear + bce",
           ("relu", "focal(gamma 2.0)"): "relu hidden + focal(gamma 2.0)"}
SWEEP_COLUMNS = ["firing", "hidden", "loss", "epochs", "rank", "recall_mean", "precision_mean", "true_active_mean",
                 "predicted_active_mean", "predicted_over_true", "budget_recall_mean", "missed_mass_mean",
                 "perplexity_dense", "perplexity_predicted", "perplexity_change", "predictor_params"]


def write_sweep(results_dir, name="predictor_sweep_scratch", rows=SWEEP, epochs=None):
    epochs = epochs or [2] * len(rows)
    table = {"title": "Predictor sweep: one row per run", "columns": SWEEP_COLUMNS,
             "rows": [[firing, hidden, loss, run_epochs, 32, 0.95, 0.7, 0.17, 0.17 * ratio, ratio, budget, 0.005,
                       186.7, 186.7 * (1 + change), change, 276672]
                      for (firing, hidden, loss, ratio, budget, change), run_epochs in zip(rows, epochs, strict=True)]}
    metrics = {"model": "scratch_12m", "runs": len(rows), "best_predicted_over_true": 1.28,
               "best_run": "firing=nonzero hidden=none loss=bce epochs=2 rank=32"}
    path = write_result(name, metrics, command="python -m sparse_lm.predictors.report", title="Predictor sweep",
                        tables=[table], results_dir=results_dir, machine=MACHINE)
    return load_result(path)


@pytest.fixture(scope="module")
def study(make_figures):
    return make_figures.figures_predictor_study


def reference_line(ax, y):
    """The horizontal lines drawn across the whole axes at height `y`."""
    return [line for line in ax.get_lines() if list(line.get_ydata()) == [y, y] and list(line.get_xdata()) == [0, 1]]


def legend_texts(legend):
    return [text.get_text() for text in legend.get_texts()]


def test_registry_matches_study_results(make_figures, study, monkeypatch):
    for name in ("predictor_scaling", "predictor_scaling_smollm2_drelu", "predictor_scaling-tiny"):
        assert make_figures.find_figure(name) is study.draw_predictor_scaling
    for name in ("predictor_sweep", "predictor_sweep_scratch"):
        assert make_figures.find_figure(name) is study.draw_predictor_sweep
    draw_predictors = make_figures.figures_predictors.draw_predictors
    assert make_figures.find_figure("predictors_smollm2_drelu") is draw_predictors
    assert make_figures.find_figure("predictor_scalingx") is None
    # "predictor_scaling..." and "predictor_sweep..." are no "predictors_*" names, even without their own figures.
    registry = sys.modules[make_figures.find_figure.__module__]
    monkeypatch.setattr(registry, "FIGURES", {"predictors": draw_predictors})
    assert make_figures.find_figure("predictors_smollm2_drelu") is draw_predictors
    assert make_figures.find_figure("predictor_scaling_smollm2_drelu") is None
    assert make_figures.find_figure("predictor_sweep_scratch") is None


def test_scaling_figure(tmp_path, study):
    fig = study.predictor_scaling_figure(write_scaling(tmp_path))
    *layer_axes, rank_ax = fig.axes
    assert len(layer_axes) == len(LAYERS)

    # Per layer: a validation line (solid, filled) and a training-pairs line (dotted, hollow) per (rank, pairs),
    # colour by rank, marker by pairs, against steps; then the 1.25 target.
    rank_colors, pair_markers = {}, {}
    for layer, ax in zip(LAYERS, layer_axes, strict=True):
        lines = ax.get_lines()
        assert len(lines) == 2 * len(RANKS) * len(PAIRS) + 1
        for (rank, pairs), val, train in zip(itertools.product(RANKS, PAIRS), lines[0:-1:2], lines[1::2],
                                                 strict=True):
            steps = [epoch * pairs // 1024 for epoch in EPOCHS]
            np.testing.assert_allclose(val.get_xdata(), steps)
            np.testing.assert_allclose(val.get_ydata(), [val_ratio(layer, pairs, rank, e) for e in EPOCHS])
            np.testing.assert_allclose(train.get_xdata(), steps)
            np.testing.assert_allclose(train.get_ydata(), [train_ratio(layer, pairs, rank, e) for e in EPOCHS])
            assert (val.get_linestyle(), train.get_linestyle(), train.get_markerfacecolor()) == ("-", ":", "white")
            assert val.get_color() == train.get_color() == rank_colors.setdefault(rank, val.get_color())
            assert val.get_marker() == train.get_marker() == pair_markers.setdefault(pairs, val.get_marker())
        assert len(reference_line(ax, 1.25)) == 1 and lines[-1].get_linestyle() == "--"
        assert ax.get_xscale() == "log"
        assert ax.get_title() == f"({'abc'[LAYERS.index(layer)]}) layer {layer}"
    assert len({matplotlib.colors.to_hex(color) for color in rank_colors.values()}) == len(RANKS)
    assert len(set(pair_markers.values())) == len(PAIRS)
    assert layer_axes[0].get_ylabel() == "predicted / firing neurons at recall 0.95"

    # Last panel: per layer the projection (x: its predictor rank, sorted) and the predictors trained longest on
    # the most pairs; the target; the rank at 10% of the FFN's FLOPs from the affine overhead.
    lines = rank_ax.get_lines()
    assert len(lines) == 2 * len(LAYERS) + 2
    for i, layer in enumerate(LAYERS):
        projection, trained = lines[2 * i], lines[2 * i + 1]
        np.testing.assert_allclose(projection.get_xdata(), [2 * rank for rank in PROJECTION_RANKS])
        np.testing.assert_allclose(projection.get_ydata(), [projection_ratio(layer, r) for r in PROJECTION_RANKS])
        np.testing.assert_allclose(trained.get_xdata(), RANKS)
        np.testing.assert_allclose(trained.get_ydata(), [val_ratio(layer, PAIRS[-1], r, EPOCHS[-1]) for r in RANKS])
        assert (trained.get_linestyle(), trained.get_marker()) == ("None", "o")
        assert projection.get_color() == trained.get_color() == f"C{i}" == layer_axes[i].title.get_color()
    assert len(reference_line(rank_ax, 1.25)) == 1
    (budget,) = [line for line in lines if list(line.get_ydata()) == [0, 1]]
    np.testing.assert_allclose(budget.get_xdata(), [RANK_AT_10_PERCENT] * 2)
    assert [text.get_text() for text in rank_ax.texts] == ["10% of the FFN's FLOPs"]
    assert rank_ax.get_xscale() == "log" and rank_ax.xaxis.get_transform().base == 2

    legend, rank_legend = fig.legends
    assert legend_texts(rank_legend) == ["layer 2", "layer 14", "layer 27", "training-free projection",
                                         "trained: 4,096 pairs, 4 epochs"]
    assert rank_legend.get_title().get_text() == "(d) against predictor rank"
    assert legend_texts(legend) == ["rank 32", "rank 96", "1,024 training pairs", "4,096 training pairs",
                                    "on validation pairs", "on training pairs (below validation: overfitting)",
                                    "target: predict at most 1.25x the firing neurons"]
    assert fig.get_suptitle() == "Predictor scaling: SmolLM2-135M (drelu FFN, nonzero firing rule)"
    assert "Test CPU" in fig.get_supxlabel()


def test_overhead_budget_rank(tmp_path, study):
    result = write_scaling(tmp_path)
    trained = {name: np.array(values, dtype=float)
               for name, values in zip(result["series"]["trained"]["columns"],
                                       zip(*result["series"]["trained"]["rows"], strict=True), strict=True)}
    assert study.overhead_budget_rank(trained) == pytest.approx(RANK_AT_10_PERCENT)
    one_rank = {name: values[trained["rank"] == 96] for name, values in trained.items()}
    assert study.overhead_budget_rank(one_rank) == pytest.approx(0.10 * 96 / (OVERHEAD_SLOPE * 96 + OVERHEAD_INTERCEPT))


def test_scaling_figure_without_projection(tmp_path, study):
    fig = study.predictor_scaling_figure(write_scaling(tmp_path, with_projection=False))
    rank_ax = fig.axes[-1]
    trained_points = [line for line in rank_ax.get_lines() if line.get_marker() == "o"]
    assert len(trained_points) == len(LAYERS) and len(rank_ax.get_lines()) == len(LAYERS) + 2
    assert "training-free projection" not in legend_texts(fig.legends[1])


def test_scaling_missing_series_is_named(tmp_path, study):
    result = write_scaling(tmp_path)
    del result["series"]["trained"]
    with pytest.raises(ValueError, match="'predictor_scaling_smollm2_drelu' has no 'trained' series"):
        study.predictor_scaling_figure(result)
    result = write_scaling(tmp_path)
    result["series"]["trained"]["columns"][3] = "flops_share"
    with pytest.raises(ValueError, match=r"'trained' series lacks columns \['overhead'\]"):
        study.predictor_scaling_figure(result)


def test_sweep_figure(tmp_path, study):
    fig = study.predictor_sweep_figure(write_sweep(tmp_path))
    ratio_ax, budget_ax, ppl_ax = fig.axes

    # Per panel, one bar container per design (in order of first run), a group per firing rule.
    for ax, column in zip(fig.axes, (3, 4, 5), strict=True):
        assert [container.get_label() for container in ax.containers] == list(DESIGNS.values())
        for (hidden, loss), container in zip(DESIGNS, ax.containers, strict=True):
            expected = [row[column] for firing in ("nonzero", "topk@0.9") for row in SWEEP
                        if row[:3] == [firing, hidden, loss]]
            np.testing.assert_allclose([bar.get_height() for bar in container], expected)
        centres = [[bar.get_x() + bar.get_width() / 2 for bar in container] for container in ax.containers]
        np.testing.assert_allclose(centres, [[x + offset for x in (0, 1)] for offset in (-0.8 / 3, 0, 0.8 / 3)])
        assert [tick.get_text() for tick in ax.get_xticklabels()] == ["nonzero", "topk@0.9"]
    assert [text.get_text() for text in ratio_ax.texts] == ["1.30", "1.31", "1.28", "1.28", "1.55", "1.46"]
    assert [text.get_text() for text in budget_ax.texts][:2] == ["0.942", "0.934"]
    assert [text.get_text() for text in ppl_ax.texts] == ["-0.19%", "-0.25%", "-0.09%", "+0.14%", "-0.18%", "-0.17%"]
    assert len(reference_line(ratio_ax, 1.25)) == 1 and len(reference_line(ppl_ax, 0)) == 1
    assert isinstance(ppl_ax.yaxis.get_major_formatter(), PercentFormatter)
    assert ppl_ax.get_title().endswith("(dense perplexity 186.7)")

    (legend,) = fig.legends
    assert legend_texts(legend) == [*DESIGNS.values(), "target: predict at most 1.25x the firing neurons"]
    assert legend.get_title().get_text() == "predictor design"
    assert fig.get_suptitle() == ("Predictor sweep: scratch_12m (6 runs; epochs 2, rank 32 each)\nbest predicted / "
                                  "firing 1.280: firing=nonzero hidden=none loss=bce epochs=2 rank=32")


def test_sweep_designs_name_what_varies(tmp_path, study):
    result = write_sweep(tmp_path, rows=SWEEP[:2] * 2, epochs=[2, 2, 4, 4])
    fig = study.predictor_sweep_figure(result)
    assert [c.get_label() for c in fig.axes[0].containers] == ["relu hidden + bce, epochs 2",
                                                              "relu hidden + bce, epochs 4"]
    assert "(4 runs; rank 32 each)" in fig.get_suptitle()


def test_sweep_without_a_run_leaves_its_bar_out(tmp_path, study):
    fig = study.predictor_sweep_figure(write_sweep(tmp_path, rows=SWEEP[:3]))  # linear + bce only under nonzero
    ratio_ax = fig.axes[0]
    linear = ratio_ax.containers[1]
    assert linear.get_label() == "linear + bce"
    np.testing.assert_allclose([bar.get_height() for bar in linear], [1.28, np.nan])
    assert [text.get_text() for text in ratio_ax.texts] == ["1.30", "1.31", "1.28", ""]


def test_sweep_missing_table_is_named(tmp_path, study):
    result = write_sweep(tmp_path)
    result["tables"][0]["columns"][14] = "ppl_change"
    with pytest.raises(ValueError, match="'predictor_sweep_scratch' has no predictor-sweep table"):
        study.predictor_sweep_figure(result)


def test_draws_study_figures(tmp_path, make_figures):
    results_dir, out_dir = tmp_path / "results", tmp_path / "figures"
    write_scaling(results_dir)
    write_sweep(results_dir)

    written = make_figures.make_figures(results_dir, out_dir)

    stems = ["predictor_scaling_smollm2_drelu", "predictor_sweep_scratch"]
    assert written == [out_dir / f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")]
    for stem in stems:
        png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
        assert png.read_bytes().startswith(b"\x89PNG") and pdf.read_bytes().startswith(b"%PDF")
        height, width, _ = matplotlib.image.imread(png).shape
        assert width > 1500 and height > 500
