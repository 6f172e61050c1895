"""Train configs: validation messages, presets that compose and run one step, the BPE trainer, ModelSpec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.common import to_config
from experiments.schemas import register
from sparse_lm.data import DataConfig
from sparse_lm.data.bpe_train import corpus_tokenizer, train_bpe
from sparse_lm.data.tokenizer import tokenizer_from_json, tokenizer_to_json
from sparse_lm.models.loading import ModelSpec
from sparse_lm.train import OptimizerConfig, TrainConfig
from sparse_lm.train.run import run
from tests.helpers import needs_smollm2
from tests.train.conftest import ROOT, TEXT

CONF = ROOT / "conf"


def compose_train(overrides: list[str]):
    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return to_config(compose("train", overrides=overrides))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 6, "accum_steps": 4}, "train.batch_size=6 is not divisible by train.accum_steps=4"),
        ({"steps": 0}, "train.steps must be positive"),
        ({"devices": -1}, "train.devices"),
    ],
)
def test_train_config_errors_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_optimizer_config_errors_name_the_key():
    with pytest.raises(ValueError, match="optim.min_lr_ratio"):
        OptimizerConfig(min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="optim.b2"):
        OptimizerConfig(b2=1.0)


def test_unknown_key_fails_while_composing():
    with pytest.raises(Exception, match="learning_rate"):
        compose_train(["+optim.learning_rate=0.1"])


def test_ffn_param_match_keeps_the_ffn_size():
    gated = ModelSpec(preset="scratch_12m", source="random").config()
    ungated = ModelSpec(preset="scratch_12m", source="random", activation="relu", ffn_param_match=True).config()
    assert ungated.d_ff == 1536 and gated.d_ff == 1024
    assert ungated.param_count() == gated.param_count()
    unmatched = ModelSpec(preset="scratch_12m", source="random", activation="relu").config()
    assert unmatched.d_ff == 1024
    assert ModelSpec(preset="tiny", source="random", d_ff=96).config().d_ff == 96


def test_checkpoint_source_needs_a_path_and_a_run_directory(tmp_path):
    with pytest.raises(ValueError, match="model.path is required when model.source=checkpoint"):
        ModelSpec(source="checkpoint")
    from sparse_lm.models.loading import build_model

    with pytest.raises(FileNotFoundError, match="model_config.json"):
        build_model(ModelSpec(source="checkpoint", path=str(tmp_path)))


def test_bpe_trainer_learns_the_requested_vocabulary(tmp_path):
    texts = [TEXT[i : i + 2000] for i in range(0, len(TEXT), 2000)]
    tokenizer = train_bpe(texts, 400)
    assert tokenizer.vocab_size == 400 and tokenizer.eos_token_id == 0
    sample = "def spam(eggs):\n    return eggs * 2  # ünïcode"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert len(tokenizer.encode("the interpreter")) < len("the interpreter") / 2  # merges learned
    again = tokenizer_from_json(json.loads(json.dumps(tokenizer_to_json(tokenizer))))
    assert again.encode(sample) == tokenizer.encode(sample) and again.fingerprint == tokenizer.fingerprint
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        train_bpe(texts, 100)


def test_corpus_tokenizer_is_cached(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    data = DataConfig(corpus="textfile", path=str(path), split="all", cache_dir=str(tmp_path / "cache"))
    first = corpus_tokenizer([data], 300)
    cached = list((tmp_path / "cache" / "tokenizers").glob("bpe300-*.json"))
    assert len(cached) == 1
    assert corpus_tokenizer([data], 300).fingerprint == first.fingerprint


def _one_step(preset: str, tmp_path: Path, extra: list[str]) -> dict:
    cfg = compose_train(
        [f"experiment={preset}", "train.steps=1", "train.batch_size=2", "train.seq_len=32", "train.progress=false",
         "eval.tokens=64", "eval.batch_size=2", "data.max_documents=3", f"data.cache_dir={tmp_path / 'cache'}",
         "tracker=noop", f"results_dir={tmp_path / 'results'}", *extra]
    )
    return cfg, run(cfg, tmp_path / "run")


@pytest.mark.real_corpus
def test_scratch_sweep_preset_runs_one_step(tmp_path):
    cfg, summary = _one_step("scratch_ffn_sweep", tmp_path, ["model.activation=relu2"])
    assert cfg.tokenizer.source.value == "train_bpe" and cfg.extra_corpora[0].value == "pydocs"
    assert summary["activation"] == "relu2" and summary["tokens"] == 64
    assert 0 < summary["sparsity"] < 1
    assert set(summary) >= {"val_perplexity_web", "val_perplexity_pydocs", "perplexity_top90"}


@needs_smollm2
@pytest.mark.real_model
@pytest.mark.parametrize("preset", ["relufy_smollm2_drelu", "relufy_smollm2_reglu"])
def test_relufy_presets_run_one_step(preset, tmp_path):
    cfg, summary = _one_step(preset, tmp_path, ["eval.topk_keep=[]"])
    assert cfg.record_as == preset
    assert summary["baseline_activation"] == "swiglu" and summary["baseline_sparsity"] == 0.0
    assert summary["activation"] == preset.rsplit("_", 1)[1]
    assert summary["start_sparsity"] > 0.4  # relu on the gate alone zeroes about half
    # the swap hurts before any training
    assert summary["start_val_perplexity"] > summary["baseline_val_perplexity"]
    result = json.loads((tmp_path / "results" / f"{preset}.json").read_text())
    assert result["metrics"]["before_val_perplexity"] == pytest.approx(summary["baseline_val_perplexity"])


@needs_smollm2
@pytest.mark.real_model
@pytest.mark.parametrize(("preset", "extra"), [
    ("relufy_smollm2_fatrelu", []),
    ("relufy_recipe_sweep", ["recipe=kd_ffn_staged", "train.steps=2", "swap.stage_steps=1", "train.log_every=1"]),
    ("relufy_lr_sweep", ["recipe=ce", "optim.lr=1e-4"]),
])
def test_fatrelu_presets_run(preset, extra, tmp_path):
    cfg, summary = _one_step(preset, tmp_path, ["eval.topk_keep=[]", "swap.calibration_tokens=256",
                                                "record_as=null", *extra])
    assert cfg.model.activation.value == "reglu" and cfg.swap.target_sparsity == 0.85
    assert summary["ffn_threshold_on"] == "gate" and len(summary["ffn_thresholds"]) == 30
    assert summary["baseline_activation"] == "swiglu"
    # thresholds at the 85% quantile of the original gate values: about 85% exact zeros in every swapped layer
    swapped_share = 1 / cfg.swap.stages  # staged recipes: 10 of 30 layers at step 0
    assert 0.8 * swapped_share < summary["start_sparsity"] < 0.9 * swapped_share
    assert summary["flops_per_token"] >= 6 * summary["params"] and 0 < summary["mfu"] < 1
    if preset == "relufy_recipe_sweep":
        history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
        assert [r["swapped_layers"] for r in history if r["kind"] == "train"] == [10, 20]
        assert 0.8 * 2 / 3 < summary["sparsity"] < 0.9 * 2 / 3
        assert summary["recipe"]["swap_stages"] == 3 and summary["recipe"]["ffn_weight"] == 1.0
    if preset == "relufy_lr_sweep":
        assert summary["recipe"] == {"kl_weight": 0.0, "ce_weight": 1.0, "ffn_weight": 0.0, "trainable": "all",
                                     "swap_stages": 1, "lr": 1e-4}


@pytest.mark.parametrize(("family", "activation", "recipe", "target"), [
    ("drelu_ce", "drelu", {"kl_weight": 0.0, "ffn_weight": 0.0, "lr": 3e-4, "swap_stages": 1}, None),
    ("reglu_l1_ce", "reglu", {"kl_weight": 0.0, "ffn_weight": 0.0, "lr": 3e-4, "swap_stages": 1}, None),
    ("drelu_kd_ffn", "drelu", {"kl_weight": 1.0, "ffn_weight": 1.0, "lr": 1e-3, "swap_stages": 1}, None),
    ("fatrelu_kd_ffn_staged", "reglu", {"kl_weight": 1.0, "ffn_weight": 1.0, "lr": 1e-3, "swap_stages": 3}, 0.85),
])
def test_family_sweep_choices_override_the_preset(family, activation, recipe, target):
    # the family group comes after the preset in train.yaml: its choices win over the preset's FATReLU settings
    cfg = compose_train(["experiment=relufy_family_sweep", f"relufy_family={family}"])
    got = {"kl_weight": cfg.distill.kl_weight, "ffn_weight": cfg.distill.ffn_weight, "lr": cfg.optim.lr,
           "swap_stages": cfg.swap.stages}
    assert cfg.model.activation.value == activation and got == recipe and cfg.swap.target_sparsity == target
    assert cfg.train.steps == 24 and cfg.l1.coefficient == (0.01 if family == "reglu_l1_ce" else 0.0)


def test_family_sweep_runs_each_family_once():
    # the preset inherits relufy_recipe_sweep's sweeper: its recipe list must not multiply the families
    register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["experiment=relufy_family_sweep"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert {k: str(v).split(",") for k, v in params.items()} == {
        "recipe": ["ce"], "relufy_family": ["drelu_ce", "reglu_l1_ce", "drelu_kd_ffn", "fatrelu_kd_ffn_staged"]}
