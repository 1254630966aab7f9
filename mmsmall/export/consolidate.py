"""Find the weights behind an export source and turn them into one fp32 VLM.

A source is any of:

* a training run folder (``{run}/checkpoints/latest`` names the newest complete checkpoint),
* a checkpoint root (the ``checkpoints`` folder with its ``latest`` file),
* one checkpoint folder (``step_00000010/``: DeepSpeed ZeRO-1/2/3 files + ``config.yaml``),
* a folder written by ``VLM.save_pretrained`` (``model_config.yaml`` + ``model.safetensors``),
* a folder exported in our HF format (``config.json`` with ``model_type: mmsmall``),
* a stock transformers Molmo2 folder (``model_type: molmo2``), prompted through its chat template.

DeepSpeed checkpoints are consolidated from the fp32 master weights held in the optimizer shards
of every rank (what ``deepspeed.utils.zero_to_fp32`` does), with every file read through
``torch.load(weights_only=True)`` and only DeepSpeed's three bookkeeping classes allow-listed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmsmall.model.vlm import VLM

log = logging.getLogger(__name__)


@dataclass
class Source:
    kind: str  # deepspeed | vlm | hf
    path: Path  # the folder holding the weights
    run_dir: Path | None = None  # the training run, when known (for the model card)


def resolve_source(src: str | Path) -> Source:
    """Classify ``src`` (see module docstring); raises FileNotFoundError saying what was expected."""
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"export source {p} does not exist")
    if (p / "model_config.yaml").exists() and (p / "model.safetensors").exists():
        return Source("vlm", p)
    if (p / "config.json").exists():
        cfg = json.loads((p / "config.json").read_text())
        if cfg.get("model_type") == "mmsmall":
            return Source("hf", p)
        if cfg.get("model_type") == "molmo2":
            return Source("molmo2", p)
    if _is_ds_checkpoint(p):
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        return Source("deepspeed", p, run)
    from mmsmall.train.resume import find_resume

    for root in (p / "checkpoints", p):
        if not (root / "latest").exists() and not any(root.glob("step_*")):
            continue
        point = find_resume(root)  # the newest verified checkpoint, as a restart would take it
        for note in point.notes:
            log.warning("export: %s", note)
        if point.tag is None or not _is_ds_checkpoint(root / point.tag):
            raise FileNotFoundError(
                f"{root}: no intact checkpoint ({'; '.join(point.notes) or 'none saved'})"
            )
        return Source("deepspeed", root / point.tag, root.parent if root.name == "checkpoints" else None)
    raise FileNotFoundError(
        f"{p}: not a run folder (checkpoints/latest), checkpoint root (latest), checkpoint folder "
        "(*_model_states.pt + config.yaml), VLM.save_pretrained folder (model_config.yaml + model.safetensors) "
        "or exported HF folder (config.json)"
    )


def _is_ds_checkpoint(p: Path) -> bool:
    return p.is_dir() and any(p.glob("*_model_states.pt"))


def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors name the offending global; keep them in the message
            raise RuntimeError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({e}); it is not a DeepSpeed "
                "checkpoint file mmsmall wrote, or it holds objects we refuse to unpickle"
            ) from e


def consolidate_deepspeed(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of the full model from a ZeRO-1/2/3 checkpoint folder (any world size)."""
    from deepspeed.checkpoint import constants as C
    from deepspeed.utils import zero_to_fp32 as z

    ckpt_dir = Path(ckpt_dir)
    model_states, extras = [], {}
    for f in z.get_model_state_files(str(ckpt_dir)):
        sd = _load(Path(f))
        if C.BUFFER_NAMES not in sd:
            raise ValueError(f"{f} is not a DeepSpeed model-state file (no {C.BUFFER_NAMES})")
        if not model_states:
            extras = _extra_module_state(sd)
        buffers = {
            k: v.float() if v.is_floating_point() else v
            for k, v in sd["module"].items()
            if k in sd[C.BUFFER_NAMES]
        }
        model_states.append(
            z.zero_model_state(
                buffers=buffers,
                param_shapes=sd[C.PARAM_SHAPES],
                shared_params=[[k, v] for k, v in sd["shared_params"].items()],
                ds_version=sd.get(C.DS_VERSION),
                frozen_param_shapes=sd.get(C.FROZEN_PARAM_SHAPES),
                frozen_param_fragments=sd.get(C.FROZEN_PARAM_FRAGMENTS),
            )
        )
    optim_files = z.get_optim_files(str(ckpt_dir))
    optim = [_load(Path(f))[C.OPTIMIZER_STATE_DICT] for f in optim_files]
    stage = optim[0][C.ZERO_STAGE]
    world = optim[0][C.PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else world
    if world != len(optim_files):
        raise ValueError(
            f"{ckpt_dir}: the checkpoint was written by {world} ranks but {len(optim_files)} optimizer shards "
            "are present; copy the whole checkpoint folder"
        )
    log.info("consolidating ZeRO-%d checkpoint %s written by %d rank(s)", stage, ckpt_dir, world)
    if stage <= 2:
        flat = [o[C.SINGLE_PARTITION_OF_FP32_GROUPS] for o in optim]
        paddings = optim[0].get(C.PARAM_ALIGNMENT_PADDINGS)
        state = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat, model_states, False, paddings)
        return {**state, **extras}
    flat = [o[C.FP32_FLAT_GROUPS] for o in optim]
    lazy = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat, model_states, False)
    return {**z.to_torch_tensor(lazy), **extras}  # ZeRO-3 yields lazily gathered tensors


def _extra_module_state(sd: dict) -> dict[str, torch.Tensor]:
    """Module state entries that are neither parameters nor buffers, which DeepSpeed's consolidation
    drops: bitsandbytes writes a 4-bit weight's quantization statistics (``<layer>.weight.absmax``,
    ``...quant_state.bitsandbytes__nf4``, ...) this way, and a QLoRA checkpoint cannot load without them."""
    from deepspeed.checkpoint import constants as C

    known = set(sd[C.BUFFER_NAMES]) | set(sd.get(C.FROZEN_PARAM_SHAPES) or {})
    for group in sd[C.PARAM_SHAPES]:
        known |= set(group)
    return {k: v for k, v in sd["module"].items() if k not in known and isinstance(v, torch.Tensor)}


def load_vlm(src: str | Path, merge_lora: bool = True) -> tuple[VLM, Source]:
    """The VLM (fp32, eval) behind an export source, and the resolved :class:`Source`.

    A checkpoint of a LoRA run (``train.lora.enabled``) gets its adapters back and, with
    ``merge_lora``, folded into the base weights (a plain VLM); without, they stay peft layers.
    """
    from mmsmall.model.vlm import VLM, build_vlm

    source = resolve_source(src)
    if source.kind == "vlm":
        return VLM.from_pretrained(source.path), source
    if source.kind == "hf":
        from mmsmall.model.hf import MMSmallForConditionalGeneration

        return MMSmallForConditionalGeneration.from_pretrained(source.path).vlm.float().eval(), source
    if source.kind == "molmo2":  # stock transformers Molmo2: mapped as `mmsmall import` does
        from mmsmall.export.importer import read_molmo2

        return read_molmo2(source.path), source
    from mmsmall.config import RunConfig, load_config
    from mmsmall.processing.tokenizer import build_tokenizer

    cfg_path = source.path / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{cfg_path} missing: the checkpoint folder must hold the run's resolved config"
        )
    run_cfg = load_config(cfg_path, cls=RunConfig)
    model_cfg = run_cfg.model
    tokenizer = build_tokenizer(model_cfg.tokenizer, model_cfg.llm.name)
    # The checkpoint holds every weight: build the architecture without loading pretrained ones.
    vision = dataclasses.replace(model_cfg.vision, pretrained=None)
    llm = model_cfg.llm
    if llm.name is not None and llm.custom is None:
        from transformers import AutoConfig

        llm = dataclasses.replace(llm, name=None, custom=AutoConfig.from_pretrained(llm.name).to_dict())
    vlm = build_vlm(dataclasses.replace(model_cfg, vision=vision, llm=llm), tokenizer)
    vlm.cfg = model_cfg  # keep the original names for the model card and later saves
    lora = run_cfg.train.lora
    if lora.enabled:
        from mmsmall.model.lora import inject_lora

        inject_lora(vlm, lora)
    state = consolidate_deepspeed(source.path)
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source.path}: consolidated weights do not fit the model in config.yaml: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if lora.enabled and merge_lora:
        from mmsmall.model.lora import merge_lora as merge

        merge(vlm)
    return vlm.float().eval(), source
