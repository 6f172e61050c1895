"""TrackerConfig validation and the conf/tracker/*.yaml presets."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sparse_lm.tracking import TrackerConfig, TrackerKind, WandbMode

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "tracker"


def test_defaults_are_jsonl_and_offline():
    cfg = TrackerConfig()
    assert cfg.kind is TrackerKind.jsonl
    assert cfg.mode is WandbMode.offline  # online without a network blocks for minutes
    assert cfg.project == "sparse_lm"


def test_strings_and_lists_are_normalised():
    cfg = TrackerConfig(kind="wandb", mode="disabled", tags=["a", "b"])
    assert cfg.kind is TrackerKind.wandb
    assert cfg.mode is WandbMode.disabled
    assert cfg.tags == ("a", "b")


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"kind": "tensorboard"}, "tracker.kind"),
        ({"mode": "dryrun"}, "tracker.mode"),
        ({"project": ""}, "tracker.project"),
        ({"entity": ""}, "tracker.entity"),
        ({"group": "  "}, "tracker.group"),
        ({"tags": "ab"}, "tracker.tags"),
        ({"tags": ("ok", "")}, "tracker.tags"),
    ],
)
def test_bad_value_names_the_key(changes, key):
    with pytest.raises(ValueError, match=key):
        TrackerConfig(**changes)


def test_enum_member_names_equal_values():
    # OmegaConf validates enum fields by member name; the YAML files use the values.
    for enum_type in (TrackerKind, WandbMode):
        assert all(member.name == member.value for member in enum_type)


@pytest.mark.parametrize("preset, kind", [("noop", "noop"), ("jsonl", "jsonl"), ("wandb", "wandb")])
def test_yaml_presets_load_into_the_schema(preset, kind):
    schema = OmegaConf.structured(TrackerConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{preset}.yaml")))
    assert isinstance(cfg, TrackerConfig)
    assert cfg.kind is TrackerKind(kind)
    assert cfg.mode is WandbMode.offline


def test_yaml_typo_in_key_or_value_fails():
    schema = OmegaConf.structured(TrackerConfig)
    with pytest.raises(Exception, match="projet"):
        OmegaConf.merge(schema, {"projet": "x"})
    with pytest.raises(Exception, match="offlin"):
        OmegaConf.merge(schema, {"mode": "offlin"})
