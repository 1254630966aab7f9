"""Config machinery: YAML + includes, dotted overrides, strict keys with helpful errors."""

from pathlib import Path

import pytest

from mmsmall.config import ConfigError, ModelConfig, RunConfig, apply_override, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_model_config_loads():
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    assert cfg.image.crop_size == 112
    assert cfg.llm.custom["model_type"] == "qwen2"


def test_overrides_are_typed_and_nested(tmp_path):
    (tmp_path / "model.yaml").write_text((ROOT / "configs/model/tiny.yaml").read_text())
    (tmp_path / "run.yaml").write_text("model: model.yaml\ntrain:\n  steps: 5\n")
    cfg = load_config(
        tmp_path / "run.yaml",
        ["train.lr.connector=2e-4", "model.connector.pool=3x3", "train.freeze=[vision]", "data.pack=false"],
    )
    assert cfg.train.lr.connector == pytest.approx(2e-4) and isinstance(cfg.train.lr.connector, float)
    assert cfg.model.connector.pool == "3x3"
    assert cfg.train.freeze == ["vision"]
    assert cfg.data.pack is False  # "false" parses as a bool, not a truthy string
    assert cfg.train.steps == 5


def test_unknown_key_lists_valid_keys(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: {connector: {pools: 2x2}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "bad.yaml")
    msg = str(e.value)
    assert "model.connector.pools" in msg and "pool_heads" in msg and "bad.yaml" in msg


def test_override_typo_and_wrong_type():
    cfg = RunConfig()
    with pytest.raises(ConfigError, match="valid keys under train.lr: connector, llm, vision"):
        apply_override(cfg, "train.lr.conector=1e-3")
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_override(cfg, "train.steps=ten")
    with pytest.raises(ConfigError, match="key=value"):
        apply_override(cfg, "train.steps")


def test_cross_field_validation(tmp_path):
    (tmp_path / "m.yaml").write_text((ROOT / "configs/model/tiny.yaml").read_text())
    (tmp_path / "r.yaml").write_text("model: m.yaml\n")
    with pytest.raises(ConfigError, match="train.freeze"):
        load_config(tmp_path / "r.yaml", ["train.freeze=[encoder]"])
    with pytest.raises(ConfigError, match="HxW"):
        load_config(tmp_path / "r.yaml", ["model.connector.pool=big"])


def test_saved_config_reloads_identically(tmp_path):
    (tmp_path / "m.yaml").write_text((ROOT / "configs/model/tiny.yaml").read_text())
    (tmp_path / "r.yaml").write_text("model: m.yaml\n")
    cfg = load_config(tmp_path / "r.yaml", ["seed=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
