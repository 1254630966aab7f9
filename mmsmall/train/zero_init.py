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
  (``load_partitioned``), never into a whole model.

The ZeRO-3 bucket sizes need the LLM width before the model exists: ``llm_hidden_size`` reads
it from configs only. Other stages build exactly as before (``build_vlm`` /
``VLM.from_pretrained``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mmsmall.model.params import full_numel, full_shape
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
    settings among ``model_keys``, the keys the run sets itself, applied: ``mmsmall.train.stage``)."""
    if zero_stage(run_cfg) != 3:
        model, tokenizer = _build(run_cfg, load_weights=True, model_keys=model_keys)
        trained = dataclasses.replace(run_cfg, model=model.cfg)
        return BuiltModel(model, tokenizer, ds_config(trained, world_size, model), run_cfg=trained)

    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    config = ds_config(run_cfg, world_size, hidden_size=llm_hidden_size(run_cfg))
    hf_ds_config = HfDeepSpeedConfig(config)  # from here on transformers builds partitioned
    model, tokenizer = _build(run_cfg, load_weights=False, model_keys=model_keys)
    deepspeed.zero.Init(module=model, config_dict_or_path=config)  # what was built whole
    if run_cfg.train.init_from:
        load_partitioned(model, Path(run_cfg.train.init_from) / "model.safetensors")
    return BuiltModel(model, tokenizer, config, hf_ds_config, dataclasses.replace(run_cfg, model=model.cfg))


def _build(
    run_cfg: Any, load_weights: bool, model_keys: list[str] | tuple[str, ...] = ()
) -> tuple[nn.Module, Any]:
    from mmsmall.model.vlm import VLM, build_vlm
    from mmsmall.processing.tokenizer import build_tokenizer
    from mmsmall.train.stage import folder_model_config, stage_model

    folder = run_cfg.train.init_from
    if not folder:
        tokenizer = build_tokenizer(run_cfg.model.tokenizer, run_cfg.model.llm.name)
        return build_vlm(run_cfg.model, tokenizer), tokenizer
    # without weights under ZeRO-3: load_state_dict would refuse the partitioned parameters
    if _is_stock_molmo2(Path(folder)):
        from mmsmall.export.importer import read_molmo2

        model = read_molmo2(folder)  # a stock transformers Molmo2 folder, mapped as `mmsmall import` does
        cfg = stage_model(model.cfg, run_cfg.model, list(model_keys))
        if cfg != model.cfg:  # processing settings, read when used; the attention set-up is built in
            if cfg.llm.attn_implementation != model.cfg.llm.attn_implementation:
                from mmsmall.config import ConfigError

                raise ConfigError(
                    f"train.init_from={folder}: model.llm.attn_implementation cannot change on a stock Molmo2 "
                    f"folder; convert it once with `mmsmall import {folder} OUT` and set train.init_from=OUT"
                )
            model.cfg, model.bidirectional_image = cfg, cfg.bidirectional_image
    else:
        cfg = stage_model(folder_model_config(folder), run_cfg.model, list(model_keys))
        model = VLM.from_pretrained(folder, load_weights=load_weights, cfg=cfg)
    log.info(
        "model, its config and tokenizer from %s (the run's model section is not used, but for the "
        "processing settings it sets itself: mmsmall/train/stage.py)",
        folder,
    )
    return model.train(), model.tokenizer


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


def load_partitioned(model: nn.Module, path: str | Path) -> None:
    """Load a ``VLM.save_pretrained`` safetensors file into a ZeRO-3 partitioned model, strictly.

    Names and shapes are checked on every rank before any collective. Then, module by module,
    every rank gathers the module's own parameters, rank 0 copies the file's tensors in, and
    leaving ``GatheredParameters(modifier_rank=0)`` cuts rank 0's values into every rank's slice.
    Persistent buffers (never partitioned) are read on every rank.
    """
    import deepspeed
    from safetensors import safe_open

    rank = dist.get_rank() if dist.is_initialized() else 0
    names: dict[int, list[str]] = {}  # a tied parameter has several names; the file holds one
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    buffers = [
        (f"{prefix}.{b}" if prefix else b, module, b)
        for prefix, module in model.named_modules()
        for b, t in module._buffers.items()
        if t is not None and b not in module._non_persistent_buffers_set
    ]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        key_of = {pid: next((n for n in ns if n in keys), None) for pid, ns in names.items()}
        missing = [names[pid][0] for pid, k in key_of.items() if k is None]
        missing += [name for name, _, _ in buffers if name not in keys]
        known = {n for ns in names.values() for n in ns} | {name for name, _, _ in buffers}
        unexpected = sorted(keys - known)
        shapes = {id(p): full_shape(p) for p in model.parameters()}
        wrong = [
            f"{k} {tuple(f.get_slice(k).get_shape())} != {shapes[pid]}"
            for pid, k in key_of.items()
            if k is not None and tuple(f.get_slice(k).get_shape()) != shapes[pid]
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} does not fit the model built from its folder: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
            )
        done: set[int] = set()
        with torch.no_grad():
            for module in model.modules():
                params = [p for p in module.parameters(recurse=False) if id(p) not in done]
                done.update(id(p) for p in params)
                if params:
                    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                        if rank == 0:
                            for p in params:
                                p.data.copy_(f.get_tensor(key_of[id(p)]))
        for name, module, b in buffers:
            module._buffers[b].copy_(f.get_tensor(name))
    log.info("loaded %s into the partitioned model (%d tensors)", path, len(keys))


def held_elements(model: nn.Module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model); equal unless partitioned."""
    held = full = 0
    for p in model.parameters():
        full += full_numel(p)
        held += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel()
    return held, full
