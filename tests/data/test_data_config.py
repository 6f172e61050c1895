"""DataConfig validation, the cache folder rule, and the conf/data/*.yaml presets against the schema."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue

from sparse_lm.data import Corpus, DataConfig, Split, resolve_cache_dir

CONF_DIR = Path(__file__).parents[2] / "conf" / "data"


def test_defaults_and_string_values_become_enums():
    assert DataConfig().corpus is Corpus.web and DataConfig().split is Split.validation
    cfg = DataConfig(corpus="pydocs", split="all", validation_fraction=0, test_fraction=0.25)
    assert cfg.corpus is Corpus.pydocs and cfg.split is Split.all
    assert cfg.validation_fraction == 0.0 and isinstance(cfg.validation_fraction, float)
    assert cfg.replace(split="test").split is Split.test


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"corpus": "bible"}, "data.corpus='bible' is not one of: web, pydocs, textfile"),
        ({"split": "valid"}, "data.split='valid' is not one of: train, validation, test, all"),
        ({"validation_fraction": 1.0}, "data.validation_fraction must be a number in [0, 1), got 1.0"),
        ({"test_fraction": -0.1}, "data.test_fraction must be a number in [0, 1), got -0.1"),
        ({"test_fraction": "0.1"}, "data.test_fraction must be a number in [0, 1), got '0.1'"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "data.validation_fraction + data.test_fraction"),
        ({"split_seed": 1.5}, "data.split_seed must be an integer, got 1.5"),
        ({"max_documents": 0}, "data.max_documents must be a positive integer or null, got 0"),
        ({"path": ""}, "data.path must be a non-empty path or null"),
        ({"corpus": "textfile"}, "data.path is required when data.corpus=textfile"),
    ],
)
def test_bad_values_name_the_key(changes, message):
    with pytest.raises(ValueError) as info:
        DataConfig(**changes)
    assert message in str(info.value)


def test_cache_dir_rule(monkeypatch, tmp_path):
    assert resolve_cache_dir(str(tmp_path / "explicit")) == tmp_path / "explicit"
    monkeypatch.setenv("SPARSE_LM_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir("") == tmp_path / "env"
    monkeypatch.delenv("SPARSE_LM_CACHE")
    assert resolve_cache_dir("") == Path.home() / ".cache" / "sparse_lm"


def _compose(name: str, **overrides) -> DataConfig:
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml"), overrides)
    return OmegaConf.to_object(merged)


def test_yaml_presets_match_the_schema():
    assert _compose("web") == DataConfig(corpus=Corpus.web)
    assert _compose("pydocs") == DataConfig(corpus=Corpus.pydocs)
    textfile = _compose("textfile", path="notes.txt")
    assert textfile == DataConfig(corpus=Corpus.textfile, path="notes.txt", split=Split.all)


def test_textfile_preset_demands_a_path():
    # to_object leaves the `???` field to the dataclass default, which __post_init__ rejects by name.
    with pytest.raises(ValueError, match="data.path is required when data.corpus=textfile"):
        _compose("textfile")
    with pytest.raises(MissingMandatoryValue):
        OmegaConf.select(OmegaConf.load(CONF_DIR / "textfile.yaml"), "path", throw_on_missing=True)


def test_schema_rejects_unknown_keys_and_values():
    with pytest.raises(ConfigKeyError):
        _compose("web", split_sed=3)
    with pytest.raises(ValueError, match="corpus"):
        _compose("web", corpus="bible")
