"""The DeepSpeed checkpoint format: one checkpoint folder (``step_00000010/``: ZeRO-1/2/3 files +
the run's ``config.yaml``) -> the fp32 state dict of the VLM it holds (``export/load.py`` builds
the VLM from the ``config.yaml`` and loads it).

DeepSpeed checkpoints are consolidated from the fp32 master weights held in the optimizer shards
of every rank (what ``deepspeed.utils.zero_to_fp32`` does), with every file read through
``torch.load(weights_only=True)`` and only DeepSpeed's three bookkeeping classes allow-listed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def is_ds_checkpoint(p: Path) -> bool:
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
