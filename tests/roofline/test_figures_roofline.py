"""analysis/figures_roofline.py: the validation figure draws paper and projected bars from a result file."""

import matplotlib.colors
import pytest

from sparse_lm.results import load_result, write_result

MACHINE = {"cpu_model": "Test CPU", "cores_logical": 2, "cores_usable": 2, "memory_gib": 8.0, "jax_backend": "cpu"}
COLUMNS = ["case", "metric", "aggregate", "models", "precision", "hardware", "paper", "projected",
           "relative_error", "within_tolerance"]
ROWS = [["a", "speedup", "single", "m", "fp16", "pc_high", 10.0, 8.0, -0.2, True],
        ["b", "tokens_per_s", "mean", "m n", "int4", "pc_high", 10.0, 20.0, 1.0, False],
        ["c", "speedup", "max", "m n", "int4", "pc_low", 4.0, 5.0, 0.25, True]]


def write(tmp_path):
    path = write_result("cost_model_validation", {"cases": 3, "cases_within_tolerance": 2, "tolerance": 0.3},
                        command="python experiments/validate_cost_model.py", title="t",
                        tables=[{"title": "Paper vs projected per case", "columns": COLUMNS, "rows": ROWS}],
                        results_dir=tmp_path, machine=MACHINE)
    return load_result(path)


@pytest.fixture(scope="module")
def roofline(make_figures):
    return make_figures.figures_roofline


def test_cases_split_by_metric(tmp_path, roofline, make_figures):
    assert make_figures.find_figure("cost_model_validation") is roofline.draw_cost_model_validation
    cases = roofline.validation_cases(write(tmp_path))
    assert list(cases) == ["speedup", "tokens_per_s"]
    assert cases["speedup"]["case"] == ["a", "c"]
    assert list(cases["speedup"]["projected"]) == [8.0, 5.0]


def test_bars_and_colours(tmp_path, roofline):
    fig = roofline.validation_figure(write(tmp_path))
    speedup, rate = fig.axes
    widths = [bar.get_width() for bar in speedup.patches]
    assert widths == [10.0, 4.0, 8.0, 5.0]  # paper bars, then projected bars, in table order
    colours = [matplotlib.colors.to_hex(bar.get_facecolor()) for bar in rate.patches]
    assert colours == [matplotlib.colors.to_hex("0.6"), matplotlib.colors.to_hex("tab:red")]  # 100% off: red


def test_draws_files(tmp_path, roofline):
    paths = roofline.draw_cost_model_validation(write(tmp_path), tmp_path / "figures")
    assert [p.name for p in paths] == ["cost_model_validation.png", "cost_model_validation.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
