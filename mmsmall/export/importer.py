"""``mmsmall import SOURCE OUT``: a stock transformers Molmo2 checkpoint -> an mmsmall model folder.

SOURCE is a local folder or a hub id (read through the hub cache; offline with ``HF_HUB_OFFLINE=1``
once cached). OUT is a ``VLM.save_pretrained`` folder, what ``train.init_from``, ``mmsmall eval``,
``chat``, ``predict`` and ``export`` take, holding besides the weights:

* the tokenizer with the checkpoint's chat template (``model.prompt: chat_template``, so eval
  prompts it the way it was trained); the image settings in ``model_config.yaml``'s ``image``;
* ``generation_config.json`` copied unchanged, and ``import.json`` (source, transformers version).

Refused with the reason (:class:`~mmsmall.export.molmo2.Molmo2Incompatible`): a folder that is not
Molmo2, a Molmo2 variant our VLM cannot express (see :mod:`mmsmall.export.molmo2`), and processor
settings our token layout does not reproduce.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from mmsmall.errors import MissingInput
from mmsmall.export.molmo2 import Molmo2Incompatible
from mmsmall.export.safetensors_io import verify_shards

if TYPE_CHECKING:
    from mmsmall.model.vlm import VLM

log = logging.getLogger(__name__)

# Molmo2Processor attribute -> the value our image token layout (processing/tokens.py) uses.
_LAYOUT = {
    "image_use_col_tokens": True,
    "use_single_crop_col_tokens": None,
    "use_single_crop_start_token": True,
}


def resolve_checkpoint(source: str | Path) -> Path:
    """A local folder as is; otherwise ``source`` is a hub id, fetched into (or read from) the hub cache."""
    p = Path(source)
    if p.exists():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source)))
    except Exception as e:  # offline without a cached copy, unknown repo, no access
        raise MissingInput(
            f"{source}: neither a local folder nor a hub checkpoint that could be fetched ({e}); "
            "give a local copy, or set HF_HUB_OFFLINE=0 with network access"
        ) from e


def is_molmo2_folder(path: str | Path) -> bool:
    """True for a transformers Molmo2 folder (``config.json`` with ``model_type: molmo2``)."""
    cfg = Path(path) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "molmo2"


def _check_processor(processor) -> None:
    wrong = [
        f"{k}={getattr(processor, k, v)!r} (mmsmall lays image tokens out with {k}={v!r})"
        for k, v in _LAYOUT.items()
        if getattr(processor, k, v) != v
    ]
    if wrong:
        raise Molmo2Incompatible("processor settings mmsmall cannot reproduce: " + "; ".join(wrong))


def load_molmo2(path: str | Path) -> VLM:
    """A stock transformers Molmo2 folder -> our VLM (fp32, eval), to fine-tune it in mmsmall.

    Shards are checked against ``checksums.json`` when the folder has one (folders we exported),
    and are read as safetensors only. The tokenizer and image settings come from the folder's
    processor. Raises :class:`~mmsmall.export.molmo2.Molmo2Incompatible` for Molmo2 variants
    our VLM cannot express.
    """
    import torch
    from transformers import AutoProcessor, Molmo2ForConditionalGeneration

    from mmsmall.export.molmo2 import from_molmo2_state_dict, model_config_from_molmo2
    from mmsmall.model.vlm import build_vlm
    from mmsmall.processing.tokenizer import build_tokenizer

    path = Path(path)
    verify_shards(path)
    molmo = Molmo2ForConditionalGeneration.from_pretrained(
        str(path), use_safetensors=True, dtype=torch.float32
    )
    processor = AutoProcessor.from_pretrained(str(path))
    cfg = model_config_from_molmo2(molmo.config, processor.image_processor, str(path))
    tokenizer = build_tokenizer(cfg.tokenizer)
    vlm = build_vlm(cfg, tokenizer)
    from_molmo2_state_dict(molmo, vlm)
    vlm.cfg.point_format = "molmo2"  # Molmo2 points in its coords text: fine-tunes and eval keep it
    return vlm.float().eval()


def read_molmo2(source: str | Path):
    """The VLM (fp32, eval) of a stock Molmo2 checkpoint, with its chat template (``model.prompt``)."""
    from transformers import AutoProcessor

    path = resolve_checkpoint(source)
    if not is_molmo2_folder(path):
        raise Molmo2Incompatible(
            f"{path}: not a transformers Molmo2 checkpoint (config.json with model_type molmo2); "
            "mmsmall import reads Molmo2ForConditionalGeneration folders"
        )
    processor = AutoProcessor.from_pretrained(str(path))
    _check_processor(processor)
    vlm = load_molmo2(path)
    template = getattr(processor, "chat_template", None) or vlm.tokenizer.chat_template
    if template:
        vlm.tokenizer.chat_template = template
        vlm.cfg.prompt = "chat_template"
    else:
        log.warning("%s has no chat template: the imported model is prompted in mmsmall's format", source)
    vlm.cfg.tokenizer.name = str(source)  # provenance; a saved folder holds the tokenizer itself
    return vlm


def import_molmo2(source: str | Path, out: str | Path, overwrite: bool = False):
    """Import ``source`` into ``out`` (see module docstring); returns the imported VLM.

    A non-empty ``out`` is refused before anything is read, unless ``overwrite`` (then the files
    the import writes are replaced and other files stay)."""
    import transformers

    from mmsmall.errors import refuse_non_empty

    out = Path(out)
    refuse_non_empty(out, "import", overwrite)
    vlm = read_molmo2(source)
    path = resolve_checkpoint(source)
    vlm.save_pretrained(out)
    gen = path / "generation_config.json"
    if gen.exists():
        shutil.copyfile(gen, out / "generation_config.json")
    meta = {"source": str(source), "format": "molmo2", "transformers": transformers.__version__}
    (out / "import.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("imported %s into %s (prompt format: %s)", source, out, vlm.cfg.prompt)
    return vlm
