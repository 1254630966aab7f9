"""Fingerprints of what changes a benchmark's answers, so the prediction cache never serves stale ones.

The cache key is the model's weights (its folder's files, or an in-memory model's tensors), the generation settings and the task's
data and prompts; a change to any of them refuses the old cache instead of scoring it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _stat_lines(root: Path) -> Iterable[str]:
    """Name, size and mtime of every file under ``root`` (cheap on a 7B folder; a rewrite changes mtime)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        yield f"{p.relative_to(root) if p != root else p.name}\t{st.st_size}\t{st.st_mtime_ns}"


def weights_fingerprint(module: Any) -> str:
    """sha256 of an in-memory model's state dict (names, dtypes, shapes, bytes): it changes with
    every weight, so answers of a model that trained on are never served from the cache."""
    import torch

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().reshape(-1).cpu().contiguous()
        h.update(f"{name}\t{t.dtype}\t{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: Any) -> str:
    """A folder's files (with ``checksums.json``'s sha256s when it has one); for a predictor
    object its own ``fingerprint``, else the weights of its ``model`` (``weights_fingerprint``),
    else its class name (an object without weights to read)."""
    if not isinstance(model, (str, os.PathLike)):
        if hasattr(model, "fingerprint"):
            return str(model.fingerprint)
        if hasattr(getattr(model, "model", None), "state_dict"):
            return weights_fingerprint(model.model)
        return type(model).__name__
    root = Path(model)
    if not root.exists():
        return "missing"
    h = hashlib.sha256()
    for line in _stat_lines(root):
        h.update(line.encode() + b"\n")
    if (root / "checksums.json").is_file():
        h.update((root / "checksums.json").read_bytes())
    return h.hexdigest()[:16]


def _image_identity(record: Any) -> str:
    if record.image_bytes is not None:
        return hashlib.sha256(record.image_bytes).hexdigest()
    if record.image_path is not None:
        p = Path(record.image_path)
        return f"{p}\t" + next(iter(_stat_lines(p))) if p.is_file() else str(p)
    if record.image is not None:
        im = record.image
        return f"{im.mode}{im.size}" + hashlib.sha256(im.tobytes()).hexdigest()
    return "none"


def data_fingerprint(records: Iterable[Any], prompts: dict[str, str]) -> str:
    """Every record's id, prompt and image (bytes hashed, files by stat): what the model sees.

    Gold answers are left out: scores are recomputed from the cached responses on every run.
    """
    h = hashlib.sha256()
    for r in records:
        line = [r.id, prompts[r.id], _image_identity(r)]
        h.update(json.dumps(line, ensure_ascii=False, default=str).encode() + b"\n")
    return h.hexdigest()[:16]
