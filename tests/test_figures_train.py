"""analysis/figures_train.py: the FFN-sweep and ReLU-fication figures, drawn from result series."""

import math

import matplotlib.image
import numpy as np
import pytest

from sparse_lm.results import load_result, write_result
from sparse_lm.train.report import curves

MACHINE = {"cpu_model": "Test CPU", "cores_logical": 2, "cores_usable": 2, "memory_gib": 8.0, "jax_backend": "cpu"}
TOKENS_PER_STEP = 4096
# variant -> (val_perplexity, sparsity, perplexity_top90); NaN where a run did not measure it.
FINAL = {
    "swiglu": (40.0, 0.0, math.nan),
    "reglu": (42.0, 0.55, 60.0),
    "drelu": (45.0, 0.85, 47.0),
    "relu2": (44.0, 0.95, 44.5),
    "relu": (50.0, 0.6, 80.0),
}


def history(rank: int, sparsity: float, steps: int = 20) -> list[dict]:
    """Training records every 5 steps and evaluations every 10, as the training loop logs them."""
    records = [
        {"kind": "train", "step": step, "tokens": step * TOKENS_PER_STEP, "loss": 9.0 - step / (10 + rank),
         "sparsity": sparsity + 0.001 * step, "l1_coefficient": 0.0, "lr": 1e-3}
        for step in range(5, steps + 1, 5)
    ]
    records += [
        {"kind": "eval", "step": step, "tokens": step * TOKENS_PER_STEP, "val_perplexity": 500.0 / (1 + step),
         "sparsity": sparsity}
        for step in range(0, steps + 1, 10)
    ]
    return records


def write_sweep(results_dir, name="scratch_ffn_sweep", final=FINAL, with_series=True):
    rows, train, evals = [], [], []
    for rank, (variant, (ppl, sparsity, ppl_top)) in enumerate(final.items()):
        rows.append([variant, 12_600_000, 20 * TOKENS_PER_STEP, ppl, sparsity, ppl_top, 1000.0])
        run = curves(history(rank, sparsity), variant)
        train += run["train"]["rows"]
        evals += run["eval"]["rows"]
    table = {"title": "FFN variants trained from scratch (same data, tokens and seed)",
             "columns": ["variant", "params", "tokens", "val_perplexity", "sparsity", "perplexity_top90",
                         "tokens_per_s"],
             "rows": rows}
    series = {"train": {"columns": run["train"]["columns"], "rows": train},
              "eval": {"columns": run["eval"]["columns"], "rows": evals}}
    path = write_result(name, {"variants": len(final)}, command="python train.py", title="FFN study",
                        tables=[table], series=series if with_series else None, results_dir=results_dir,
                        machine=MACHINE)
    return load_result(path)


def write_relufy(results_dir, name="relufy_smollm2_drelu", series_keys=("train", "eval"), **metrics):
    series = {key: value for key, value in curves(history(0, 0.7)).items() if key in series_keys}
    metrics = {"activation": "drelu", "params": 134_515_008, "after_val_perplexity": 500 / 21, **metrics}
    path = write_result(name, metrics, command="python train.py", title=f"Training: {name}", series=series,
                        results_dir=results_dir, machine=MACHINE)
    return load_result(path)


@pytest.fixture(scope="module")
def figures_train(make_figures):
    return make_figures.figures_train


def points(ax, marker):
    """(x, y) of every single-point line drawn with `marker`."""
    return sorted((float(line.get_xdata()[0]), float(line.get_ydata()[0]))
                  for line in ax.get_lines() if line.get_marker() == marker and len(line.get_xdata()) == 1)


def test_registry_matches_training_results(make_figures, figures_train):
    assert make_figures.find_figure("scratch_ffn_sweep") is figures_train.draw_scratch_ffn_sweep
    assert make_figures.find_figure("scratch_ffn_sweep_small") is figures_train.draw_scratch_ffn_sweep
    for name in ("relufy_smollm2_drelu", "relufy_sample", "relufy-reglu"):
        assert make_figures.find_figure(name) is figures_train.draw_relufy
    assert make_figures.find_figure("relufying") is None
    assert [figures_train.count(n) for n in (256, 614_400, 12_600_000)] == ["256", "614k", "12.6M"]


def test_sweep_figure_values(tmp_path, figures_train):
    result = write_sweep(tmp_path)
    fig = figures_train.scratch_ffn_sweep_figure(result)
    loss_ax, sparsity_ax, ppl_ax = fig.axes

    assert [line.get_label() for line in loss_ax.get_lines()] == list(FINAL)
    drelu_loss, drelu_sparsity = loss_ax.get_lines()[2], sparsity_ax.get_lines()[2]
    steps = np.array([5, 10, 15, 20])
    np.testing.assert_allclose(drelu_loss.get_xdata(), steps * TOKENS_PER_STEP)
    np.testing.assert_allclose(drelu_loss.get_ydata(), 9.0 - steps / 12)
    np.testing.assert_allclose(drelu_sparsity.get_ydata(), 0.85 + 0.001 * steps)

    dense = sorted((sparsity, ppl) for ppl, sparsity, _ in FINAL.values())
    np.testing.assert_allclose(points(ppl_ax, "o"), dense)
    # Top-10% kept means at least 90% zeros: relu2, already sparser, stays at its own sparsity; swiglu has no value.
    np.testing.assert_allclose(points(ppl_ax, "v"), sorted([(0.9, 60.0), (0.9, 47.0), (0.95, 44.5), (0.9, 80.0)]))
    connectors = [line for line in ppl_ax.get_lines() if len(line.get_xdata()) == 2]
    assert len(connectors) == 4
    assert sorted(text.get_text() for text in ppl_ax.texts) == sorted(FINAL)
    assert ppl_ax.get_yscale() == "log"
    assert "12.6M parameters, 81.9k tokens per variant" in fig.get_suptitle()


def test_relufy_figure_values(tmp_path, figures_train):
    result = write_relufy(tmp_path, before_val_perplexity=20.5, before_activation="swiglu", perplexity_top90=26.0)
    fig = figures_train.relufy_figure(result)
    loss_ax, sparsity_ax, ppl_ax = fig.axes

    np.testing.assert_allclose(loss_ax.get_lines()[0].get_ydata(), 9.0 - np.array([5, 10, 15, 20]) / 10)
    validation = next(line for line in sparsity_ax.get_lines() if line.get_label() == "validation")
    np.testing.assert_allclose(validation.get_xdata(), [0, 10 * TOKENS_PER_STEP, 20 * TOKENS_PER_STEP])
    np.testing.assert_allclose(validation.get_ydata(), [0.7, 0.7, 0.7])
    np.testing.assert_allclose(ppl_ax.get_lines()[0].get_ydata(), [500.0, 500 / 11, 500 / 21])
    before = [line for line in ppl_ax.get_lines() if list(line.get_ydata()) == [20.5, 20.5]]
    assert len(before) == 1 and list(before[0].get_xdata()) == [0, 1]  # spans the axes: a reference line
    assert [text.get_text() for text in ppl_ax.texts] == ["original swiglu model: 20.5"]
    assert points(ppl_ax, "v") == [(20 * TOKENS_PER_STEP, 26.0)]
    assert "swiglu \N{RIGHTWARDS ARROW} drelu FFN, 135M parameters" in fig.get_suptitle()

    # Optional metrics absent or NaN: no reference line, no note, no top-k point; the curves are still drawn.
    bare = figures_train.relufy_figure(write_relufy(tmp_path, "relufy_bare", perplexity_top90=math.nan))
    assert len(bare.axes[2].texts) == 0 and points(bare.axes[2], "v") == []
    assert len(bare.axes[2].get_lines()) == 1


def test_missing_series_is_named(tmp_path, figures_train):
    no_series = write_sweep(tmp_path, with_series=False)
    with pytest.raises(ValueError, match="'scratch_ffn_sweep' has no 'train' series"):
        figures_train.scratch_ffn_sweep_figure(no_series)
    train_only = write_relufy(tmp_path, series_keys=("train",))
    with pytest.raises(ValueError, match="'relufy_smollm2_drelu' has no 'eval' series"):
        figures_train.relufy_figure(train_only)
    no_loss = write_relufy(tmp_path)
    no_loss["series"]["train"]["columns"][2] = "cross_entropy"
    with pytest.raises(ValueError, match=r"'train' series lacks columns \['loss'\]"):
        figures_train.relufy_figure(no_loss)


def test_draws_training_figures(tmp_path, make_figures):
    results_dir, out_dir = tmp_path / "results", tmp_path / "figures"
    write_sweep(results_dir)
    write_relufy(results_dir, before_val_perplexity=20.5)

    written = make_figures.make_figures(results_dir, out_dir)

    stems = ["relufy_smollm2_drelu", "scratch_ffn_sweep"]
    assert written == [out_dir / f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")]
    for stem in stems:
        png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5_000
        height, width, _ = matplotlib.image.imread(png).shape
        assert width > 1500 and height > 500
