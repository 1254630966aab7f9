"""Build the training model, partitioned from the start under ZeRO-3.

``build_model(run_cfg, world_size)`` is what the loop calls. With ``zero_optimization.stage`` 3 in
``train.deepspeed`` no rank ever holds the whole LLM (at 7B that is ~28 GB of fp32 per rank):

- an ``HfDeepSpeedConfig`` of the filled DeepSpeed config is alive while the VLM is built (and as
  long as the returned ``BuiltModel``), so transformers constructs the LLM (and an HF vision tower
  from the hub) inside ``deepspeed.zero.Init``: each parameter is cut into per-rank slices as its
  module is created; ``from_config`` then initializes, ``from_pretrained`` loads (rank 0 reads,
  one module at a time) and ``resize_token_embeddings`` resizes partition-wise;
- the rest (open_clip tower, connector, HF towers from a config dict) is built whole and
  partitioned right after the VLM (``zero.Init(module=...)``, rank 0's values broadcast).
  open_clip writes into modules after creating them (``nn.MultiheadAttention`` zeroes its output
  bias, timm re-initializes its blocks, a checkpoint goes through ``load_state_dict``), and
  transformers resizes embeddings outside any ``zero.Init`` (inside one, its mean-resizing writes
  into an already partitioned new embedding and fails), so the VLM is not built inside an outer
  ``zero.Init``;
- ``train.init_from`` (a later stage): the folder's weights go straight into the slices
  (``mmsmall.export.load.load_partitioned``), never into a whole model.

The building and loading is the one loader's (``mmsmall.export.load.load_model`` with its
``zero3`` switch); this module fills the DeepSpeed config first. The ZeRO-3 bucket sizes need the
LLM width before the model exists: ``llm_hidden_size`` reads it from configs only.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmsmall.model.params import full_numel
from mmsmall.train.engine import ds_config, zero_stage

log = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    model: nn.Module  # the VLM
    tokenizer: Any
    ds_config: dict[str, Any]  # the filled DeepSpeed config it was built with (for build_engine)
    hf_ds_config: Any = None  # ZeRO-3: transformers reads ZeRO-3 from it only while it is alive
    run_cfg: Any = None  # the run config trained: with train.init_from, its model is the folder's


def llm_hidden_size(run_cfg: Any) -> int:
    """The LLM width from configs alone: ``train.init_from``'s ``llm_config.json`` (or its model
    config), ``model.llm.custom``, or ``AutoConfig`` of ``model.llm.name`` (no weights read)."""
    from transformers import AutoConfig

    from mmsmall.config import ModelConfig, load_config
    from mmsmall.model.vlm import custom_llm_config, folder_configs, offline_config

    llm = run_cfg.model.llm
    if run_cfg.train.init_from:
        folder = Path(run_cfg.train.init_from)
        _refuse_stock_under_zero3(folder)
        saved = load_config(folder / "model_config.yaml", cls=ModelConfig)
        llm = offline_config(saved, *folder_configs(folder)).llm
    if llm.custom is not None:
        config = custom_llm_config(llm.custom)
    else:
        config = AutoConfig.from_pretrained(llm.name)
    return int(config.get_text_config().hidden_size)


def build_model(run_cfg: Any, world_size: int, model_keys: list[str] | tuple[str, ...] = ()) -> BuiltModel:
    """The VLM to train (``train.init_from``'s, else ``run_cfg.model``'s), its tokenizer and the
    filled DeepSpeed config, and the run config it trains (``run_cfg`` is not changed; with
    ``init_from``, the returned config's model section is the folder's, with the processing
    settings among ``model_keys``, the keys the run sets itself, applied: ``mmsmall.train.stage``).
    Built by the one loader, ``mmsmall.export.load.load_model``."""
    from mmsmall.export.load import load_model

    folder = run_cfg.train.init_from
    source = folder or run_cfg.model
    adjust = _staged(run_cfg, list(model_keys)) if folder else None
    if zero_stage(run_cfg) != 3:
        model = load_model(source, adjust=adjust).train()
        trained = dataclasses.replace(run_cfg, model=model.cfg)
        return BuiltModel(model, model.tokenizer, ds_config(trained, world_size, model), run_cfg=trained)
    config = ds_config(run_cfg, world_size, hidden_size=llm_hidden_size(run_cfg))
    model = load_model(source, zero3=config, adjust=adjust).train()
    hf_ds_config = model.__dict__.pop("hf_ds_config")  # kept alive by BuiltModel from here
    return BuiltModel(
        model, model.tokenizer, config, hf_ds_config, dataclasses.replace(run_cfg, model=model.cfg)
    )


def _staged(run_cfg: Any, model_keys: list[str]):
    """``load_model``'s ``adjust`` for a later stage: the folder's model config with the run's own
    processing settings (``stage_model``); a stock Molmo2 folder keeps its attention set-up."""
    from mmsmall.train.stage import stage_model

    def adjust(cfg: Any, source: Any) -> Any:
        staged = stage_model(cfg, run_cfg.model, model_keys)
        if source.kind == "molmo2" and staged.llm.attn_implementation != cfg.llm.attn_implementation:
            from mmsmall.config import ConfigError

            folder = run_cfg.train.init_from
            raise ConfigError(
                f"train.init_from={folder}: model.llm.attn_implementation cannot change on a stock Molmo2 "
                f"folder; convert it once with `mmsmall import {folder} OUT` and set train.init_from=OUT"
            )
        log.info(
            "model, its config and tokenizer from %s (the run's model section is not used, but for the "
            "processing settings it sets itself: mmsmall/train/stage.py)",
            run_cfg.train.init_from,
        )
        return staged

    return adjust


def _is_stock_molmo2(folder: Path) -> bool:
    from mmsmall.export.importer import is_molmo2_folder

    return not (folder / "model_config.yaml").exists() and is_molmo2_folder(folder)


def _refuse_stock_under_zero3(folder: Path) -> None:
    if _is_stock_molmo2(folder):
        from mmsmall.config import ConfigError

        raise ConfigError(
            f"train.init_from={folder} is a stock transformers Molmo2 folder, which ZeRO-3 cannot load "
            f"partitioned; convert it once with `mmsmall import {folder} OUT` and set train.init_from=OUT"
        )


def held_elements(model: nn.Module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model); equal unless partitioned."""
    held = full = 0
    for p in model.parameters():
        full += full_numel(p)
        held += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
    return held, full
