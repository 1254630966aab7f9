"""Resumable checkpoints: DeepSpeed state plus each rank's step, data position and RNG states.

Layout under ``{out_dir}/checkpoints``::

    step_00000010/            DeepSpeed's files (model, optimizer, scheduler; per-rank shards)
        client_rank00000.pt   this rank's {"step", "data", "rng"} (a plain dict)
        config.yaml           the resolved run config
        complete.json         written last: every file's size (restarts verify it, export/intact.py)
    latest                    the tag of the newest *complete* checkpoint (a hint; see export/intact.py)

``latest`` is written through a temporary file and ``os.replace`` only after every rank has
finished writing, so a process killed in the middle of a save leaves the previous ``latest``
pointing at a complete checkpoint. Older complete checkpoints beyond ``keep_last`` are removed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmsmall.config import save_config
from mmsmall.errors import MissingInput
from mmsmall.export import intact
from mmsmall.train import resume

log = logging.getLogger(__name__)

_TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_latest(ckpt_root: str | Path) -> str | None:
    path = Path(ckpt_root) / "latest"
    return path.read_text().strip() if path.exists() else None


def _write_latest(ckpt_root: Path, tag: str) -> None:
    tmp = ckpt_root / f"latest.tmp{os.getpid()}"
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_root / "latest")


def _prune(ckpt_root: Path, keep_last: int, current: str) -> None:
    tags = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and _TAG_RE.match(p.name))
    # keep the newest keep_last up to and including current; newer dirs are leftovers of a killed save
    done = [t for t in tags if t <= current]
    for tag in done[: max(0, len(done) - max(1, keep_last))]:
        shutil.rmtree(ckpt_root / tag, ignore_errors=True)


def save(
    engine: Any,
    ckpt_root: str | Path,
    step: int,
    data_state: dict,
    run_cfg: Any,
    *,
    keep_last: int = 2,
    kill_during_save: bool = False,
) -> Path:
    """Write the checkpoint of ``step`` on every rank, then move ``latest`` to it."""
    ckpt_root = Path(ckpt_root)
    tag = tag_of(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        resume.set_aside(ckpt_root / tag)  # a folder of this step is an earlier run's: keep it
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state={"step": step}, save_latest=False)
    if kill_during_save:  # tests: die with DeepSpeed's files written but the checkpoint unfinished
        log.warning("debug: killing rank %d in the middle of saving %s", rank, tag)
        os.kill(os.getpid(), signal.SIGKILL)
    client = {"step": step, "data": data_state, "rng": rng_state()}
    tmp = ckpt_root / tag / f"client_rank{rank:05d}.pt.tmp"
    torch.save(client, tmp)
    os.replace(tmp, ckpt_root / tag / f"client_rank{rank:05d}.pt")
    if rank == 0:
        save_config(run_cfg, ckpt_root / tag / "config.yaml")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        intact.write_complete(ckpt_root / tag, dist.get_world_size() if dist.is_initialized() else 1)
        _write_latest(ckpt_root, tag)
        _prune(ckpt_root, keep_last, tag)
        log.info("saved checkpoint %s", ckpt_root / tag)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_root / tag


# What numpy's RNG state (a uint32 array) unpickles through: the array rebuild function is taken
# from the public pickle protocol (``ndarray.__reduce__``), not from numpy's private modules.
_NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, np.zeros(0).__reduce__()[0], np.dtypes.UInt32DType]


def saved_world_size(ckpt_dir: Path) -> int | None:
    """How many ranks wrote the checkpoint in ``ckpt_dir`` (from ``complete.json``; None if unknown)."""
    marker = ckpt_dir / intact.COMPLETE
    return json.loads(marker.read_text()).get("world_size") if marker.exists() else None


def _to_universal(ckpt_root: Path, tag: str) -> str:
    """Convert checkpoint ``tag`` to DeepSpeed's universal layout in ``{tag}.universal`` (rank 0;
    every rank waits); returns the tag to load. A world-size change loads through it."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    out = ckpt_root / f"{tag}.universal"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)  # a conversion killed midway
        args = Namespace(
            input_folder=str(ckpt_root / tag),
            output_folder=str(out),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # no tensor or pipeline parallelism: the default info is right
        )
        ds_to_universal.main(args)
    if dist.is_initialized():
        dist.barrier()
    return out.name


def load_latest(engine: Any, ckpt_root: str | Path, tag: str | None = None) -> dict[str, Any] | None:
    """Load checkpoint ``tag`` (default: the newest intact one, see ``intact.find_resume``) into
    the engine; returns this rank's client state (step, data position; RNG states already
    restored) or None when there is none.

    A checkpoint written by another number of ranks loads through DeepSpeed's universal
    checkpoint (``_to_universal``; the engine must be built with ``checkpoint.load_universal``),
    and the client state holds every old rank's data position under ``"data_all"`` (see
    ``TrainData.load_elastic``)."""
    ckpt_root = Path(ckpt_root)
    tag = tag if tag is not None else intact.find_resume(ckpt_root).tag
    if tag is None:
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved = saved_world_size(ckpt_root / tag) or world
    client_path = ckpt_root / tag / f"client_rank{rank:05d}.pt"
    if saved == world and not client_path.exists():  # only a checkpoint without complete.json
        raise MissingInput(
            f"{client_path} missing: checkpoint {tag} predates complete.json and was written by fewer "
            f"ranks than this run has ({world}); resume it with the world size it was saved on"
        )
    load_tag = tag if saved == world else _to_universal(ckpt_root, tag)
    load_path, _ = engine.load_checkpoint(str(ckpt_root), tag=load_tag, load_module_strict=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / load_tag}")
    clients = [_read_client(ckpt_root / tag / f"client_rank{r:05d}.pt") for r in range(saved)]
    if saved != world:
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            shutil.rmtree(ckpt_root / load_tag, ignore_errors=True)  # made again if needed
            (ckpt_root / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer
        log.info("resumed a %d-rank checkpoint on %d ranks (DeepSpeed universal checkpoint)", saved, world)
    client = dict(clients[rank] if rank < saved else clients[0])
    if saved != world:
        client["data_all"] = [c["data"] for c in clients]
        if rank >= saved:  # no old rank of this number: fresh randomness of its own
            client["rng"] = None
    if client["rng"] is not None:
        set_rng_state(client["rng"])
    log.info("resumed from %s (step %d)", ckpt_root / tag, client["step"])
    return client


def _read_client(path: Path) -> dict[str, Any]:
    # Our own file, still read with weights_only: only the numpy types of its RNG state are allowed.
    with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
        return torch.load(path, weights_only=True)


def save_model(engine: Any, out: str | Path) -> Path | None:
    """Write the trained VLM with ``save_pretrained`` (rank 0).

    Under ZeRO-3 the shards are gathered one parameter at a time into rank 0's CPU memory, so no
    device ever holds more than one whole parameter (gathering the whole model at once, on every
    rank, is what runs a 7B out of GPU memory at the end of a ZeRO-3 run)."""
    import deepspeed

    model = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0
    if engine.zero_optimization_stage() == 3:
        full = []
        for p in model.parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    full.append(p.data.to("cpu", copy=True))
        if rank == 0:
            _save_detached(model, out, full)
    elif rank == 0:
        _save_detached(model, out)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        log.info("saved the trained model to %s", out)
    return Path(out) if rank == 0 else None


def _save_detached(model: Any, out: str | Path, full: list[torch.Tensor] | None = None) -> None:
    """``save_pretrained`` on private CPU copies of the weights, restored afterwards.

    Under ZeRO-1/2 DeepSpeed keeps the parameters as views into flat buffers, which safetensors
    refuses to save (shared storage); each parameter is pointed at its own CPU copy for the save.
    ``full``: the copies already made (ZeRO-3's gathered parameters, in ``parameters()`` order).
    """
    saved = [(p, p.data) for p in model.parameters()]
    with torch.no_grad():
        for i, (p, data) in enumerate(saved):
            p.data = data.to("cpu", copy=True) if full is None else full[i]
        try:
            model.save_pretrained(out)
        finally:
            for p, data in saved:
                p.data = data
