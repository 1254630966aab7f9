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
        [
            "train.lr.connector=2e-4",
            "model.image.pooling_size=[3, 3]",
            "train.freeze=[vision]",
            "data.pack=false",
        ],
    )
    assert cfg.train.lr.connector == pytest.approx(2e-4) and isinstance(cfg.train.lr.connector, float)
    assert cfg.model.image.pooling_size == [3, 3]
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
    with pytest.raises(
        ConfigError, match=r"model.connector.pool: removed \(the pooling window is model.image.pooling_size"
    ):
        load_config(tmp_path / "r.yaml", ["model.connector.pool=big"])


def test_saved_config_reloads_identically(tmp_path):
    (tmp_path / "m.yaml").write_text((ROOT / "configs/model/tiny.yaml").read_text())
    (tmp_path / "r.yaml").write_text("model: m.yaml\n")
    cfg = load_config(tmp_path / "r.yaml", ["seed=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_removed_keys_name_their_replacement_and_saved_defaults_still_load(tmp_path):
    """model.connector.pool (dead: the window is model.image.pooling_size), data.shuffle_buffer (never
    read) and the train.debug_kill_* test knobs are gone: a user's other value is refused naming the
    replacement; a config saved before, holding the value that was in effect, loads unchanged."""
    import yaml

    from mmsmall.config import to_dict
    from mmsmall.train.resume import check_resume_config

    (tmp_path / "m.yaml").write_text((ROOT / "configs/model/tiny.yaml").read_text())
    saved = to_dict(load_config(None, ["model=" + str(tmp_path / "m.yaml")]))
    saved["model"]["connector"]["pool"] = "2x2"  # what every folder saved before this held
    saved["data"]["shuffle_buffer"] = 256
    saved["train"].update(debug_kill_at_step=0, debug_kill_during_save=False)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_config(tmp_path / "ckpt" / "config.yaml")
    assert to_dict(cfg) == to_dict(load_config(None, ["model=" + str(tmp_path / "m.yaml")]))
    assert check_resume_config(cfg, tmp_path / "ckpt") == []  # nothing changed for a resume
    for key, value, hint in (
        (("model", "connector", "pool"), "3x3", "model.image.pooling_size"),
        (("data", "shuffle_buffer"), 512, "never read"),
        (("train", "debug_kill_at_step"), 10, "MMSMALL_TEST_KILL_AT_STEP"),
    ):
        bad = yaml.safe_load(yaml.safe_dump(saved))
        node = bad
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = value
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=rf"{'.'.join(key)}: removed \(.*{hint}"):
            load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="train.debug_kill_during_save: removed"):
        load_config(None, ["train.debug_kill_during_save=true"])
    save_config(cfg, tmp_path / "again.yaml")  # what is saved now holds none of them
    text = (tmp_path / "again.yaml").read_text()
    assert "shuffle_buffer" not in text and "debug_kill" not in text and "pool:" not in text
    assert isinstance(cfg, RunConfig)


def test_validation_lists_come_from_their_registries(tmp_path):
    from mmsmall.config import MODULES
    from mmsmall.model.vision import VISION_BACKENDS
    from mmsmall.model.vlm import MASK_IMPLEMENTATIONS
    from mmsmall.train.engine import _module_of
    from mmsmall.train.inputs import _require_model_names

    assert MODULES == ("connector", "vision", "llm")
    with pytest.raises(ConfigError, match=", ".join(sorted(MODULES))):
        load_config(None, ["model=" + str(ROOT / "configs/model/tiny.yaml"), "train.freeze=[encoder]"])
    model = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    model.vision.backend = "timm"
    with pytest.raises(ConfigError, match=f"valid: {', '.join(sorted(VISION_BACKENDS))}"):
        _require_model_names(model)
    model = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    model.llm.attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match=f"valid: {', '.join(MASK_IMPLEMENTATIONS)}"):
        _require_model_names(model)
    assert {_module_of(f"{m}.weight") for m in MODULES} == set(MODULES)
