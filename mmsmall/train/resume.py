"""Which checkpoint a restart resumes from, verified; and which config changes a resume may carry.

A save ends with ``complete.json`` in its folder (every file's size, written by rank 0 after all
ranks finished) before ``latest`` moves. A restart trusts files, not the pointer: it takes the
newest ``step_*`` folder whose marker is there and whose files all still have their sizes, so a
deleted or dangling ``latest`` or a damaged newest checkpoint falls back to the previous intact one,
and the log says which one and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsmall.config import ConfigError, to_dict

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
_TAG_RE = re.compile(r"^step_(\d{8})$")

# Keys a resume applies as given: they change how a run is logged, saved or stopped, not what it
# learns (train.steps re-times the cosine decay from the next step on). Any other change is refused.
RESUMABLE_KEYS = (
    "name", "out_dir", "train.steps", "train.save_every", "train.keep_last", "train.log_every",
    "train.tensorboard", "train.wandb", "train.debug_kill_at_step", "train.debug_kill_during_save",
    "data.num_workers",
)  # fmt: skip


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


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _same_global_batch(old: dict, new: dict, ckpt_dir: Path, world_size: int | None) -> bool:
    """Whether ``train.grad_accum`` changed with the world size so that the global batch is kept
    (a resume on another number of processes)."""
    marker = ckpt_dir / COMPLETE
    saved = json.loads(marker.read_text()).get("world_size") if marker.exists() else None
    if world_size is None or saved is None:
        return False
    return old.get("train.grad_accum", 0) * saved == new.get("train.grad_accum", 0) * world_size


def check_resume_config(run_cfg: Any, ckpt_dir: Path, world_size: int | None = None) -> list[str]:
    """Refuse a resume whose config differs from the checkpoint's in a key that changes training.

    ``train.grad_accum`` may change when ``world_size`` differs from the checkpoint's and their
    product (the global batch) stays. Returns the applied changes (``key: old -> new``); raises
    ``ConfigError`` naming every refused key.
    """
    import yaml

    saved_path = ckpt_dir / "config.yaml"
    if not saved_path.exists():
        return []
    old, new = _flat(yaml.safe_load(saved_path.read_text()) or {}), _flat(to_dict(run_cfg))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if new.get("train.init_from") and old.get("train.init_from") == new.get("train.init_from"):
        # a later stage's model is the init_from folder's (the saved config holds it, the YAML does
        # not): the same folder is the same model
        changed = [k for k in changed if not k.startswith("model.")]
    allowed = RESUMABLE_KEYS + (
        ("train.grad_accum",) if _same_global_batch(old, new, ckpt_dir, world_size) else ()
    )
    refused = [k for k in changed if k not in allowed]
    if refused:
        listed = ", ".join(f"{k}={new.get(k)!r} (checkpoint: {old.get(k)!r})" for k in refused)
        raise ConfigError(
            f"resume from {ckpt_dir}: changed {listed}; a resume keeps the checkpoint's optimizer and "
            f"schedule, so these would not take effect. Restore them, or start a new out_dir "
            f"(train.init_from={ckpt_dir.parent.parent / 'model'} to start from its weights)"
        )
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def set_aside(ckpt_dir: Path) -> Path | None:
    """Move a checkpoint folder this run did not write out of the way (never overwrite it)."""
    if not ckpt_dir.exists():
        return None
    n = 1
    while (dest := ckpt_dir.with_name(f"{ckpt_dir.name}.old{n}")).exists():
        n += 1
    os.replace(ckpt_dir, dest)
    log.warning("%s existed from an earlier run; moved to %s instead of overwriting it", ckpt_dir, dest)
    return dest
