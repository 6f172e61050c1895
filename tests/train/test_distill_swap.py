"""Distillation (KL on logits, FFN-output matching), FFN-only training, gate thresholds and the staged swap."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_lm.models.capture import split_capturing
from sparse_lm.models.config import Activation, ThresholdTarget
from sparse_lm.models.ffn import CapturePoint, thresholded_hidden
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer
from sparse_lm.train import TrainRunConfig
from sparse_lm.train.config import DistillConfig, SwapConfig
from sparse_lm.train.run import run
from sparse_lm.train.step import Teacher, distillation_kl, init_state, make_train_step, split_model
from sparse_lm.train.swap import layer_groups, stage_at, swapped_layers
from tests.train.conftest import tiny_run_config


def test_kl_matches_hand_computation_and_vanishes_on_equal_logits():
    student = jnp.array([[[1.0, 0.0, -1.0]]])
    teacher = jnp.array([[[0.0, 2.0, 0.0]]])
    p = np.exp([0.0, 2.0, 0.0]) / np.exp([0.0, 2.0, 0.0]).sum()
    q = np.exp([1.0, 0.0, -1.0]) / np.exp([1.0, 0.0, -1.0]).sum()
    expected = float(np.sum(p * np.log(p / q)))
    np.testing.assert_allclose(distillation_kl(student, teacher, 1.0)[0, 0], expected, rtol=1e-5)
    # temperature 2: T^2 KL of the softened distributions
    p2, q2 = np.exp(np.array([0.0, 1.0, 0.0])), np.exp(np.array([0.5, 0.0, -0.5]))
    p2, q2 = p2 / p2.sum(), q2 / q2.sum()
    np.testing.assert_allclose(distillation_kl(student, teacher, 2.0)[0, 0], 4 * np.sum(p2 * np.log(p2 / q2)),
                               rtol=1e-5)
    assert float(distillation_kl(teacher, teacher, 1.0)[0, 0]) == pytest.approx(0.0, abs=1e-6)


def test_gate_threshold_is_fatrelu_on_reglu_and_cats_on_swiglu():
    gate = jnp.array([-2.0, -0.5, 0.2, 0.6, 1.5])
    up = jnp.array([1.0, 2.0, 3.0, -1.0, 0.5])
    fat = thresholded_hidden(Activation.reglu, gate, up, 0.5, ThresholdTarget.gate)
    np.testing.assert_allclose(fat, [0.0, 0.0, 0.0, -0.6, 0.75])
    cats = thresholded_hidden(Activation.swiglu, gate, up, 0.25, ThresholdTarget.gate)
    silu = np.asarray(jax.nn.silu(gate))  # |silu| = 0.238, 0.189, 0.110, 0.386, 1.226
    np.testing.assert_allclose(cats, [0.0, 0.0, 0.0, silu[3] * -1.0, silu[4] * 0.5], rtol=1e-6)
    # the hidden target keeps |a| > t instead: a = relu(g) up = [0, 0, 0.6, -0.6, 0.75]
    np.testing.assert_allclose(thresholded_hidden(Activation.reglu, gate, up, 0.6, ThresholdTarget.hidden),
                               [0.0, 0.0, 0.0, 0.0, 0.75])
    with pytest.raises(ValueError, match="ffn_threshold_on=gate needs a gated FFN"):
        TINY.replace(activation=Activation.relu, ffn_thresholds=(0.1,), ffn_threshold_on="gate")


def _step_inputs(seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (1, 4, 17), 0, TINY.vocab_size)
    return tokens, jnp.ones(tokens.shape, bool)


def _student_and_teacher():
    teacher_model = Transformer(TINY, rngs=nnx.Rngs(0))
    student = Transformer(TINY.replace(activation=Activation.reglu), rngs=nnx.Rngs(0))
    return student, teacher_model


def test_distillation_objective_is_the_weighted_sum_and_zero_kl_for_the_teacher_itself():
    student, teacher_model = _student_and_teacher()
    teacher = Teacher(*split_capturing(teacher_model, (CapturePoint.ffn_output,)))
    tokens, mask = _step_inputs()
    tx = optax.sgd(0.0)
    points = (CapturePoint.ffn_hidden, CapturePoint.ffn_output)
    graphdef, params, rest = split_model(student, points)
    step = make_train_step(graphdef, rest, tx, student.config, teacher=teacher, kl_weight=1.0, ffn_weight=1.0)
    _, metrics = step(init_state(params, tx, 0), tokens, mask, jnp.float32(0), jnp.float32(1))
    assert float(metrics.kl) > 1e-4 and float(metrics.ffn_match) > 1e-3  # the swap changed the model
    # the teacher distilled into its own copy: no KL, no FFN mismatch
    twin = Transformer(TINY, rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(twin, points)
    step = make_train_step(graphdef, rest, tx, twin.config, teacher=teacher, kl_weight=1.0, ffn_weight=1.0)
    _, metrics = step(init_state(params, tx, 0), tokens, mask, jnp.float32(0), jnp.float32(1))
    assert float(metrics.kl) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics.ffn_match) == pytest.approx(0.0, abs=1e-10)


def test_distillation_lowers_kl_to_the_teacher():
    student, teacher_model = _student_and_teacher()
    teacher = Teacher(*split_capturing(teacher_model, ()))
    tokens, mask = _step_inputs()
    tx = optax.adam(3e-3)
    graphdef, params, rest = split_model(student)
    step = make_train_step(graphdef, rest, tx, student.config, teacher=teacher, kl_weight=1.0, ce_weight=0.0)
    state = init_state(params, tx, 0)
    kls = []
    for _ in range(15):
        state, metrics = step(state, tokens, mask, jnp.float32(0), jnp.float32(1))
        kls.append(float(metrics.kl))
    assert kls[-1] < 0.5 * kls[0]


def test_ffn_only_training_leaves_every_other_parameter_unchanged():
    student, _ = _student_and_teacher()
    tx = optax.adam(1e-2)
    graphdef, params, rest = split_model(student)
    state = init_state(params, tx, 0, trainable_ffn_only=True)
    # copies: the step donates its input state
    before = [(p, np.array(v)) for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state.params))[0]]
    step = make_train_step(graphdef, rest, tx, student.config, trainable_ffn_only=True)
    tokens, mask = _step_inputs()
    state, _ = step(state, tokens, mask, jnp.float32(0), jnp.float32(1))
    after = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state.params))[0])
    changed = {jax.tree_util.keystr(p) for p, v in before if not np.array_equal(v, after[p])}
    assert changed and all("['ffn']" in p for p in changed)  # not ffn_norm either
    assert any("w_gate" in p for p in changed) and any("w_down" in p for p in changed)
    # the optimiser holds moments for the FFN matrices only
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_ffn = sum(x.size for p, x in before if "['ffn']" in jax.tree_util.keystr(p))
    assert n_opt == 2 * n_ffn + 1  # Adam's two moments plus its step count


def test_staged_swap_groups_and_stages():
    assert [g.tolist() for g in layer_groups(5, 2)] == [[0, 1, 2], [3, 4]]
    cfg = SwapConfig(stages=3, stage_steps=4)
    assert [stage_at(cfg, s) for s in (0, 3, 4, 8, 100)] == [1, 1, 2, 3, 3]
    assert swapped_layers(cfg, 6, 5).tolist() == [0, 1, 2, 3]
    assert swapped_layers(SwapConfig(), 6, 0).tolist() == list(range(6))
    with pytest.raises(ValueError, match="swap.stage_steps"):
        SwapConfig(stages=2)


def test_config_refuses_distillation_without_a_swap(text_file, tmp_path):
    cfg = tiny_run_config(text_file, tmp_path)
    with pytest.raises(ValueError, match="activation is swapped"):
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation=None),
                            distill=DistillConfig(kl_weight=1.0))
    with pytest.raises(ValueError, match="nothing to train"):
        DistillConfig(ce_weight=0.0)


def test_run_calibrates_gate_thresholds_to_the_target_and_resumes_with_them(text_file, tmp_path):
    cfg = tiny_run_config(text_file, tmp_path, steps=4, trainable="ffn")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, activation="reglu"),
        distill=DistillConfig(kl_weight=1.0, ffn_weight=1.0),
        swap=SwapConfig(target_sparsity=0.8, calibration_tokens=1024, stages=2, stage_steps=2),
    )
    assert isinstance(cfg, TrainRunConfig)
    summary = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "model_config.json").read_text())
    assert saved["ffn_threshold_on"] == "gate" and len(saved["ffn_thresholds"]) == 2
    assert all(t > 0 for t in saved["ffn_thresholds"])
    # thresholds at the 80% quantile of the gate: about 80% of the validation FFN values are exact zeros
    assert 0.7 < summary["sparsity"] < 0.9
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    swapped = [r["swapped_layers"] for r in history if r["kind"] == "train"]
    assert swapped == [1, 1, 2, 2]
    assert all(r["kl"] > 0 for r in history if r["kind"] == "train")
    # resuming reads the saved thresholds instead of calibrating again
    cfg_more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4))
    again = run(cfg_more, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "model_config.json").read_text())["ffn_thresholds"] == \
        saved["ffn_thresholds"]
    assert again["val_perplexity"] == pytest.approx(summary["val_perplexity"])


def test_distilled_staged_run_resumes_to_the_same_losses(text_file, tmp_path):
    """Stopped at step 3 (a diverging step: nothing saved after the step-2 checkpoint) and rerun, a run with a
    teacher, calibrated thresholds and a staged swap continues exactly as the uninterrupted run."""
    from sparse_lm.train.run import TrainingDivergedError

    def config(nan_at_step):
        cfg = tiny_run_config(text_file, tmp_path, steps=6, checkpoint_every=2, eval_every=100,
                              nan_at_step=nan_at_step)
        return dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, activation="reglu"),
            distill=DistillConfig(kl_weight=1.0, ffn_weight=0.5),
            swap=SwapConfig(target_sparsity=0.7, calibration_tokens=512, stages=2, stage_steps=3),
        )

    def losses(run_dir):
        lines = (run_dir / "history.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"], r["kl"], r["ffn_match"], r["swapped_layers"])
                for r in map(json.loads, lines) if r["kind"] == "train"]

    run(config(None), tmp_path / "whole")
    with pytest.raises(TrainingDivergedError):
        run(config(2), tmp_path / "parts")  # step index 2 is the third step
    run(config(None), tmp_path / "parts")
    whole, parts = losses(tmp_path / "whole"), losses(tmp_path / "parts")
    assert [r[0] for r in parts] == [1, 2, 3, 4, 5, 6] and [r[4] for r in parts] == [1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(np.array(parts)[:, 1:4], np.array(whole)[:, 1:4], rtol=1e-6)


def test_original_model_spec_drops_the_swap(tmp_path):
    from sparse_lm.train.checkpoint import original_model_spec

    model = {"preset": "smollm2_135m", "source": "gguf", "path": None, "seed": 0, "activation": "reglu",
             "d_ff": None, "ffn_param_match": False, "ffn_thresholds": [0.5], "ffn_threshold_on": "gate",
             "tokenizer_path": None}
    (tmp_path / "config.json").write_text(json.dumps({"model": model}))
    spec = original_model_spec(tmp_path)
    assert spec.activation is None and spec.ffn_thresholds is None and spec.ffn_threshold_on is None
    assert spec.source.value == "gguf" and spec.preset == "smollm2_135m"
    (tmp_path / "config.json").write_text(json.dumps({"model": {**model, "source": "random"}}))
    assert original_model_spec(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        original_model_spec(tmp_path / "nowhere")
