"""The one loader above the release formats: any model folder -> one fp32 VLM.

A source is any of:

* a training run folder (``{run}/checkpoints/latest`` names the newest complete checkpoint),
* a checkpoint root (the ``checkpoints`` folder with its ``latest`` file),
* one checkpoint folder (``step_00000010/``: DeepSpeed ZeRO-1/2/3 files + ``config.yaml``),
* a folder written by ``VLM.save_pretrained`` (``model_config.yaml`` + ``model.safetensors``),
* a folder exported in our HF format (``config.json`` with ``model_type: mmsmall``),
* a stock transformers Molmo2 folder (``model_type: molmo2``), prompted through its chat template,
* an adapter-only export (``adapters.json``): the base model recorded in it, with the adapters merged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmsmall.errors import MissingInput
from mmsmall.export.consolidate import is_ds_checkpoint, load_checkpoint

if TYPE_CHECKING:
    from mmsmall.model.vlm import VLM

log = logging.getLogger(__name__)


@dataclass
class Source:
    kind: str  # deepspeed | vlm | hf | molmo2 | adapter
    path: Path  # the folder holding the weights
    run_dir: Path | None = None  # the training run, when known (for the model card)


def resolve_source(src: str | Path) -> Source:
    """Classify ``src`` (see module docstring); raises FileNotFoundError saying what was expected."""
    p = Path(src)
    if not p.exists():
        raise MissingInput(f"export source {p} does not exist")
    from mmsmall.model.lora import is_adapter_folder

    if is_adapter_folder(p):
        return Source("adapter", p)
    if (p / "model_config.yaml").exists() and (p / "model.safetensors").exists():
        return Source("vlm", p)
    if (p / "config.json").exists():
        cfg = json.loads((p / "config.json").read_text())
        if cfg.get("model_type") == "mmsmall":
            return Source("hf", p)
        if cfg.get("model_type") == "molmo2":
            return Source("molmo2", p)
    if is_ds_checkpoint(p):
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        return Source("deepspeed", p, run)
    from mmsmall.export.intact import find_resume

    for root in (p / "checkpoints", p):
        if not (root / "latest").exists() and not any(root.glob("step_*")):
            continue
        point = find_resume(root)  # the newest verified checkpoint, as a restart would take it
        for note in point.notes:
            log.warning("export: %s", note)
        if point.tag is None or not is_ds_checkpoint(root / point.tag):
            raise MissingInput(f"{root}: no intact checkpoint ({'; '.join(point.notes) or 'none saved'})")
        return Source("deepspeed", root / point.tag, root.parent if root.name == "checkpoints" else None)
    raise MissingInput(
        f"{p}: not a run folder (checkpoints/latest), checkpoint root (latest), checkpoint folder "
        "(*_model_states.pt + config.yaml), VLM.save_pretrained folder (model_config.yaml + model.safetensors) "
        "or exported HF folder (config.json)"
    )


def load_vlm(src: str | Path, merge_lora: bool = True) -> tuple[VLM, Source]:
    """The VLM (fp32, eval) behind ``src`` (see module docstring), and the resolved :class:`Source`.

    A checkpoint of a LoRA run (``train.lora.enabled``) gets its adapters back and, with
    ``merge_lora``, folded into the base weights (a plain VLM); without, they stay peft layers.
    """
    source = resolve_source(src)
    if source.kind == "adapter":  # an adapter-only export: put on the base recorded in it
        from mmsmall.model.lora import adapter_base, load_adapter

        return load_adapter(source.path, load_vlm(adapter_base(source.path))[0]), source
    if source.kind == "vlm":
        from mmsmall.model.vlm import VLM

        return VLM.from_pretrained(source.path), source
    if source.kind == "hf":
        from mmsmall.export.hf import MMSmallForConditionalGeneration

        return MMSmallForConditionalGeneration.from_pretrained(source.path).vlm.float().eval(), source
    if source.kind == "molmo2":  # stock transformers Molmo2: mapped as `mmsmall import` does
        from mmsmall.export.importer import read_molmo2

        return read_molmo2(source.path), source
    return load_checkpoint(source.path, merge_lora=merge_lora), source
