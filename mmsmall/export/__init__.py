"""Release formats: our own HF classes and stock transformers Molmo2 (see release.py).

Public entry points (imported lazily, so ``import mmsmall.export`` stays light):
``run_export(src, out, fmt="mmsmall"|"molmo2", eval_results=None) -> Path``,
``load_molmo2(path) -> VLM``, ``import_molmo2(source, out) -> VLM``, ``chat(...)``, ``predict(...)``.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "run_export": "mmsmall.export.release",
    "load_molmo2": "mmsmall.export.release",
    "save_molmo2": "mmsmall.export.release",
    "import_molmo2": "mmsmall.export.importer",
    "save_mmsmall": "mmsmall.export.release",
    "chat": "mmsmall.export.chat",
    "predict": "mmsmall.export.chat",
    "Molmo2Incompatible": "mmsmall.export.molmo2",
    "ShardIntegrityError": "mmsmall.export.safetensors_io",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmsmall.export' has no attribute {name!r}")
