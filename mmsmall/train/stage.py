"""A later stage (``train.init_from``): the folder's model, with the run's own processing settings.

The model a later stage trains is the folder's (its widths, layers, vocabulary and weights); the
run's YAML usually names a base model file only to be complete. The ``model.*`` keys the run
sets *itself* (``model.…`` overrides on the command line, and the keys of an inline ``model:``
mapping in the run's YAML) are compared with the folder's: those in ``APPLIED`` change how
samples are processed and prompted, not a parameter shape, and take effect; any other one that
differs would be silently ignored, so the run is refused, naming the keys.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from mmsmall.config import ConfigError, ModelConfig, flatten, load_config, to_dict
from mmsmall.resources import find_config

# model.* keys a later stage may change: none of them changes a parameter's shape
APPLIED = (
    "image.max_crops", "image.max_crops_eval", "image.overlap_margins", "image.mean", "image.std",
    "style_prefix", "bidirectional_image", "emit_vocab", "prompt", "llm.attn_implementation",
)  # fmt: skip


def explicit_model_keys(config: str | Path, overrides: list[str]) -> list[str]:
    """The ``model.*`` keys (without the ``model.`` prefix) the run sets itself; a key stands for
    every key below it (``image`` for ``image.max_crops``)."""
    raw = yaml.safe_load(find_config(config).read_text()) or {}
    keys = (
        list(flatten(raw["model"], "model"))
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict)
        else []
    )
    keys += [o.split("=", 1)[0].strip() for o in overrides if o.strip().startswith("model")]
    return sorted({k.removeprefix("model").lstrip(".") for k in keys})


def folder_model_config(folder: str | Path) -> ModelConfig | None:
    """The saved model config of an ``init_from`` folder (None for a stock Molmo2 folder)."""
    path = Path(folder) / "model_config.yaml"
    return load_config(path, cls=ModelConfig) if path.is_file() else None


def stage_model(
    folder_cfg: ModelConfig | None, run_model: ModelConfig, explicit: list[str]
) -> ModelConfig | None:
    """The folder's model config with the run's explicit ``APPLIED`` settings; ConfigError naming
    every explicit key that differs from the folder's and cannot be applied."""
    if folder_cfg is None or not explicit:
        return folder_cfg
    old, new = flatten(to_dict(folder_cfg)), flatten(to_dict(run_model))
    given = [k for k in new if any(k == e or k.startswith(e + ".") or e == "" for e in explicit)]
    changed = [k for k in given if old.get(k) != new[k]]
    refused = [k for k in changed if k not in APPLIED]
    if refused:
        listed = ", ".join(f"model.{k}={new[k]!r} (the folder's: {old.get(k)!r})" for k in refused)
        raise ConfigError(
            f"train.init_from: {listed}: these set parameter shapes or weights, which come from the "
            "init_from folder; drop them (a later stage keeps its model), or train a new model without init_from"
        )
    cfg = copy.deepcopy(folder_cfg)
    for k in changed:
        *path, name = k.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        setattr(node, name, copy.deepcopy(_get(run_model, k)))
    return cfg


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def folder_point_format(folder: str | Path) -> str:
    """The pointing text the model in ``folder`` was trained in (``model.point_format``): a stock
    Molmo2 folder and a folder ``mmsmall import`` wrote speak ``molmo2``."""
    folder = Path(folder)
    path = folder / "model_config.yaml"
    if path.is_file():
        raw = yaml.safe_load(path.read_text()) or {}
        if isinstance(raw, dict) and raw.get("point_format"):
            return str(raw["point_format"])
        imported = folder / "import.json"  # imported before model_config.yaml recorded it
        if imported.is_file() and json.loads(imported.read_text()).get("format") == "molmo2":
            return "molmo2"
        return "molmo"
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "molmo2":
        return "molmo2"
    return "molmo"


def resolve_point_format(cfg: Any) -> str:
    """Fill ``data.point_format`` (the pointing text the run trains in) when the run leaves it
    unset: the ``init_from`` model's format, else ``model.point_format``; a run without
    ``init_from`` records it in ``model.point_format`` (its saved model speaks it)."""
    if not cfg.data.point_format:
        init = cfg.train.init_from
        cfg.data.point_format = folder_point_format(init) if init else cfg.model.point_format
    if not cfg.train.init_from:
        cfg.model.point_format = cfg.data.point_format
    return cfg.data.point_format
