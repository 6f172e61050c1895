"""analysis/figures_frontier.py: the frontier figure drawn from a frontier record."""

import math

import matplotlib.image
import pytest

from sparse_lm.eval.frontier import COLUMNS
from sparse_lm.results import load_result, write_result

MACHINE = {"cpu_model": "Test CPU", "cores_logical": 2, "cores_usable": 2, "memory_gib": 8.0, "jax_backend": "cpu"}


def _row(method, target, sparsity, increase):
    return [method, target, sparsity, sparsity, 10 * (1 + increase / 100), 8 * (1 + increase / 100), increase,
            increase]


def write_frontier(results_dir, rows):
    metrics = {"tokens_per_corpus": 16384, "context": 512, "dense_perplexity_web": 10.0, "dense_perplexity_pydocs": 8.0}
    return write_result("frontier_smollm2", metrics, command="python experiments/frontier.py", title="Frontier",
                        tables=[{"title": "Perplexity against FFN sparsity (same tokens)", "columns": list(COLUMNS),
                                 "rows": rows}], results_dir=results_dir, machine=MACHINE)


@pytest.fixture
def figures_frontier(make_figures):
    return make_figures.figures_frontier


def test_frontier_figure_has_a_line_per_rule_and_a_star_per_trained_model(tmp_path, make_figures, figures_frontier):
    rows = [_row("dense", 0.0, 0.0, 0.0)] + [_row("teal", t, t, 100 * t**3) for t in (0.5, 0.8)] + [
        _row("cats", t, t, 200 * t**3) for t in (0.5, 0.8)] + [_row("fatrelu_kd", math.nan, 0.86, 30.0)]
    result = load_result(write_frontier(tmp_path, rows))
    fig = figures_frontier.frontier_figure(result)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["teal", "cats", "fatrelu_kd (trained)"]
    teal = ax.get_lines()[0]
    assert list(teal.get_xdata()) == [50.0, 80.0] and list(teal.get_ydata()) == pytest.approx([12.5, 51.2])
    assert ax.get_lines()[2].get_marker() == "*"
    assert make_figures.find_figure("frontier_smollm2") is figures_frontier.draw_frontier
    paths = figures_frontier.draw_frontier(result, tmp_path / "figures")
    assert matplotlib.image.imread(paths[0]).shape[1] > 1000


def test_training_curves_get_their_own_panel(tmp_path, figures_frontier):
    rows = [_row("dense", 0.0, 0.0, 0.0), _row("kd", math.nan, 0.85, 80.0), _row("kd", math.nan, 0.86, 40.0)]
    path = write_frontier(tmp_path, rows)
    result = load_result(path)
    result["tables"].append({"title": "Training curve of kd", "columns": ["tokens", "val_perplexity_web",
                             "val_perplexity_pydocs", "sparsity"],
                             "rows": [["original", 14.0, 9.0, 0.0], [0, 160.0, 120.0, 0.3], [2048, 40.0, 30.0, 0.86]]})
    fig = figures_frontier.frontier_figure(result)
    assert len(fig.axes) == 3
    stars = [line for line in fig.axes[0].get_lines() if line.get_label() == "kd (trained)"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [85.0, 86.0]  # both checkpoints, one line
    curve = fig.axes[2]
    web = next(line for line in curve.get_lines() if line.get_label() == "kd: web")
    assert list(web.get_xdata()) == [1, 2048] and list(web.get_ydata()) == [160.0, 40.0]
    assert sorted(line.get_ydata()[0] for line in curve.get_lines() if line.get_label().startswith("_")) == \
        pytest.approx([9.9, 15.4])  # +10% of the original on each corpus


def test_frontier_figure_names_missing_columns(tmp_path, figures_frontier):
    result = load_result(write_frontier(tmp_path, [_row("dense", 0.0, 0.0, 0.0)]))
    result["tables"][0]["columns"][2] = "zeros_web"
    with pytest.raises(ValueError, match="sparsity_web"):
        figures_frontier.frontier_figure(result)
