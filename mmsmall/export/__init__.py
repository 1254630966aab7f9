"""Release formats and the one loader above them (see docs/ARCHITECTURE.md).

* ``hf.py``: our own HF classes (model_type ``mmsmall``); ``release.py``: writing a release in our
  format or stock transformers Molmo2 (``molmo2.py`` maps the weights); ``importer.py``: stock
  Molmo2 folders in; ``consolidate.py``: DeepSpeed ZeRO checkpoints to one state dict;
  ``load.py``: any of these folders (or a training run) -> one VLM.

Public entry points (imported lazily, so ``import mmsmall.export`` stays light):
``run_export(src, out, fmt="mmsmall"|"molmo2", eval_results=None) -> Path``, ``load_vlm(src) -> (VLM, Source)``,
``load_molmo2(path) -> VLM``, ``import_molmo2(source, out) -> VLM``.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "run_export": "mmsmall.export.release",
    "save_molmo2": "mmsmall.export.release",
    "save_mmsmall": "mmsmall.export.release",
    "load_vlm": "mmsmall.export.load",
    "load_molmo2": "mmsmall.export.importer",
    "import_molmo2": "mmsmall.export.importer",
    "Molmo2Incompatible": "mmsmall.export.molmo2",
    "ShardIntegrityError": "mmsmall.export.safetensors_io",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmsmall.export' has no attribute {name!r}")
