"""lmms-eval integration: the ``mmsmall`` model backend (:mod:`mmsmall.lmms.backend`).

``manifest`` is the ``lmms_eval.models`` entry point (pyproject.toml); lmms-eval calls it to learn
that ``--model mmsmall`` is :class:`mmsmall.lmms.backend.MmsmallLMM`.
"""

from __future__ import annotations

MODEL_ID = "mmsmall"
CLASS_PATH = "mmsmall.lmms.backend.MmsmallLMM"


def manifest():
    """The model manifest lmms-eval's registry loads from our entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
