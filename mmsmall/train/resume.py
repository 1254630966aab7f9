"""Which config changes a resume may carry, and setting aside an earlier run's checkpoint folder.

Which checkpoint a restart resumes from (the newest intact one) is :func:`mmsmall.export.intact.find_resume`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mmsmall.config import ConfigError, flatten, strip_removed, to_dict
from mmsmall.export.intact import COMPLETE

log = logging.getLogger(__name__)

# Keys a resume applies as given: they change how a run is logged, saved or stopped, not what it
# learns (train.steps re-times the cosine decay from the next step on). Any other change is refused.
RESUMABLE_KEYS = (
    "name", "out_dir", "train.steps", "train.save_every", "train.keep_last", "train.log_every",
    "train.tensorboard", "train.wandb", "data.num_workers",
)  # fmt: skip


def _same_global_batch(old: dict, new: dict, ckpt_dir: Path, world_size: int | None) -> bool:
    """Whether ``train.grad_accum`` changed with the world size so that the global batch is kept
    (a resume on another number of processes)."""
    marker = ckpt_dir / COMPLETE
    saved = json.loads(marker.read_text()).get("world_size") if marker.exists() else None
    if world_size is None or saved is None:
        return False
    return old.get("train.grad_accum", 0) * saved == new.get("train.grad_accum", 0) * world_size


def check_resume_config(
    run_cfg: Any, ckpt_dir: Path, world_size: int | None = None, model: Any = None
) -> list[str]:
    """Refuse a resume whose config differs from the checkpoint's in a key that changes training.

    ``train.grad_accum`` may change when ``world_size`` differs from the checkpoint's and their
    product (the global batch) stays. ``model``: with ``train.init_from``, the model config the
    run trains (``stage.stage_model``): its processing settings are compared. Returns the
    applied changes (``key: old -> new``); raises ``ConfigError`` naming every refused key.
    """
    import yaml

    from mmsmall.train.stage import APPLIED

    saved_path = ckpt_dir / "config.yaml"
    if not saved_path.exists():
        return []
    saved = strip_removed(type(run_cfg), yaml.safe_load(saved_path.read_text()) or {})  # keys since removed
    old, new = flatten(saved), flatten(to_dict(run_cfg))
    for key in ("data.point_format", "model.point_format"):  # checkpoints from before the key: Molmo's text
        old.setdefault(key, "molmo")
    if model is not None:
        new.update({f"model.{k}": v for k, v in flatten(to_dict(model)).items() if k in APPLIED})
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if new.get("train.init_from") and old.get("train.init_from") == new.get("train.init_from"):
        # a later stage's model is the init_from folder's (the saved config holds it, the YAML does
        # not): the same folder is the same model; its processing settings are the run's own
        own = {f"model.{k}" for k in APPLIED} if model is not None else set()
        changed = [k for k in changed if not k.startswith("model.") or k in own]
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


def global_batch_change(run_cfg: Any, ckpt_dir: Path, world_size: int) -> str | None:
    """A note when resuming on ``world_size`` processes changes the global batch the checkpoint
    trained with (micro batch x grad_accum x processes), naming the grad_accum that keeps it."""
    import yaml

    marker, saved_path = ckpt_dir / COMPLETE, ckpt_dir / "config.yaml"
    if not (marker.exists() and saved_path.exists()):
        return None
    saved_world = json.loads(marker.read_text()).get("world_size")
    old = (yaml.safe_load(saved_path.read_text()) or {}).get("train", {})
    t = run_cfg.train
    if not saved_world or saved_world == world_size:
        return None
    before = (
        old.get("micro_batch_size", t.micro_batch_size) * old.get("grad_accum", t.grad_accum) * saved_world
    )
    after = t.micro_batch_size * t.grad_accum * world_size
    if before == after:
        return None
    keeps, rest = divmod(before, t.micro_batch_size * world_size)
    fix = f"train.grad_accum={keeps} keeps it" if keeps and not rest else "no whole train.grad_accum keeps it"
    return (
        f"the global batch changes from {before} to {after} micro-batch rows per step ({saved_world} processes "
        f"-> {world_size}, train.grad_accum={t.grad_accum}); {fix}"
    )


# What a run writes about itself besides checkpoints and its model; a fresh run sets an earlier
# run's aside so that its logs, curves and eval answers are its own.
RECORDS = ("log.jsonl", "eval.jsonl", "eval", "tensorboard", "loss.png")


def set_aside_records(out: Path) -> None:
    """Move an earlier run's records (``RECORDS``, ``samples_rank*.jsonl``) out of the way."""
    for path in [*(out / name for name in RECORDS), *sorted(out.glob("samples_rank*.jsonl"))]:
        set_aside(path)


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
