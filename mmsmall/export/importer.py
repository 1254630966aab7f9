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

if TYPE_CHECKING:
    from mmsmall.model.vlm import VLM

log = logging.getLogger(__name__)


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


def load_molmo2(path: str | Path) -> VLM:
    """A stock transformers Molmo2 folder -> our VLM (fp32, eval), prompted in mmsmall's format:
    ``load_model`` of it without its chat template. Shards are checked against ``checksums.json``
    when the folder has one (folders we exported), and are read as safetensors only."""
    from mmsmall.export.load import Source, load_model

    return load_model(Source("molmo2", Path(path), chat_template=False))


def read_molmo2(source: str | Path) -> VLM:
    """The VLM (fp32, eval) of a stock Molmo2 checkpoint (a folder or hub id), with its chat template
    (``model.prompt``): ``load_model`` of it. Refused with the reason
    (:class:`~mmsmall.export.molmo2.Molmo2Incompatible`) for Molmo2 variants our VLM cannot express."""
    from mmsmall.export.load import Source, load_model

    path = resolve_checkpoint(source)
    if not is_molmo2_folder(path):
        raise Molmo2Incompatible(
            f"{path}: not a transformers Molmo2 checkpoint (config.json with model_type molmo2); "
            "mmsmall import reads Molmo2ForConditionalGeneration folders"
        )
    vlm = load_model(Source("molmo2", path))
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
