"""Which checkpoint folders are whole: the ``complete.json`` marker and the newest intact one.

A save ends with ``complete.json`` in its folder (every file's size, written by rank 0 after all
ranks finished) before ``latest`` moves. A reader trusts files, not the pointer: it takes the
newest ``step_*`` folder whose marker is there and whose files all still have their sizes, so a
deleted or dangling ``latest`` or a damaged newest checkpoint falls back to the previous intact one,
and the notes say which one and why. Training resumes (:mod:`mmsmall.train.resume`) and export
(:mod:`mmsmall.export.load`) pick their checkpoint here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

COMPLETE = "complete.json"
_TAG_RE = re.compile(r"^step_(\d{8})$")


def write_complete(ckpt_dir: Path, world_size: int) -> None:
    """Record every file of a finished checkpoint with its size (rank 0, after all ranks wrote)."""
    files = {
        p.relative_to(ckpt_dir).as_posix(): p.stat().st_size
        for p in sorted(ckpt_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }
    tmp = ckpt_dir / f"{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"world_size": world_size, "files": files}, indent=1))
    os.replace(tmp, ckpt_dir / COMPLETE)


def damage(ckpt_dir: Path, named_by_latest: bool = False) -> str | None:
    """Why ``ckpt_dir`` cannot be resumed from, or None when every recorded file is intact.

    ``named_by_latest``: a run saved before markers existed (no folder has one) and ``latest``
    names this folder; then it is accepted when it holds its run config (``latest`` moved only
    after a full save).
    """
    marker = ckpt_dir / COMPLETE
    if not marker.exists():
        if named_by_latest and (ckpt_dir / "config.yaml").exists():
            return None
        return "its save did not finish (no complete.json)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "complete.json is unreadable"
    for name, size in files.items():
        p = ckpt_dir / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} when saved"
    return None


@dataclass
class ResumePoint:
    tag: str | None  # the checkpoint to resume from, None = start at step 0
    notes: list[str] = field(default_factory=list)  # what was passed over, and why


def find_resume(ckpt_root: str | Path) -> ResumePoint:
    """The newest intact checkpoint under ``ckpt_root`` (``latest`` is a hint, not the truth)."""
    root = Path(ckpt_root)
    tags = sorted((p.name for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name)), reverse=True) if root.is_dir() else []  # fmt: skip
    latest_file = root / "latest"
    latest = latest_file.read_text().strip() if latest_file.exists() else None
    notes = []
    if latest is None and tags:
        notes.append("checkpoints/latest is missing")
    elif latest is not None and latest not in tags:
        notes.append(f"checkpoints/latest names {latest!r}, which is no checkpoint folder here")
    legacy = not any((root / t / COMPLETE).exists() for t in tags)  # saved before markers existed
    for tag in tags:
        why = damage(root / tag, named_by_latest=legacy and tag == latest)
        if why is None:
            return ResumePoint(tag, notes)
        notes.append(f"{tag} skipped: {why}")
    return ResumePoint(None, notes)
