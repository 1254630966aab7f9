"""Output shards written by executor tasks: shard i holds the kept samples of rank i*S .. (i+1)*S - 1.

The driver assigns each task its rank range and the units it spans (a few numbers per shard) and
writes the manifest from the entries the tasks return; a task reads its samples' members from the
unit stage tars, their keys from ``work/reduce/`` (see ``global_pass``), and commits its shard and
marker itself, so a rerun skips every shard whose marker names the same content.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from mmsmall.config import from_dict

from .config import CurateConfig
from .shards import ShardWriter


class StageReader:
    """Members of one unit's stage tar, read in memory (one unit cached at a time)."""

    def __init__(self, units_dir: Path):
        self.units_dir = units_dir
        self.uid: str | None = None
        self.members: dict[str, bytes] = {}

    def get(self, uid: str, name: str) -> bytes | None:
        if uid != self.uid:
            with tarfile.open(self.units_dir / f"{uid}.tar") as tar:
                self.members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
            self.uid = uid
        return self.members.get(name)


def write_shard(
    i: int, chunk: list[tuple[str, int, str]], cfg: CurateConfig, work: Path, out: Path, fp: str,
    reader: StageReader | None = None,
) -> dict:  # fmt: skip
    """Write output shard ``i`` from ``chunk`` [(uid, pos, key)] unless its marker names this content."""
    content = hashlib.sha256(json.dumps([fp, cfg.prefix, chunk]).encode()).hexdigest()
    marker = work / "shards" / f"{i:06d}.json"
    if marker.exists():
        m = json.loads(marker.read_text())
        if m["content"] == content and (out / m["entry"]["name"]).exists():
            return m["entry"]
    reader = reader or StageReader(work / "units")
    w = ShardWriter(out, cfg.prefix, max_count=len(chunk) + 1, start_index=i)
    for uid, pos, key in chunk:
        meta = json.loads(reader.get(uid, f"s{pos:06d}.json"))
        names = (
            [f"s{pos:06d}.{i}" for i in range(len(meta["images"]))] if "images" in meta else [f"s{pos:06d}"]
        )
        images, exts = [], []
        for name in names:  # each image's member, whichever extension normalization gave it
            ext = next(e for e in ("jpg", "png") if reader.get(uid, f"{name}.{e}") is not None)
            images.append(reader.get(uid, f"{name}.{ext}"))
            exts.append(ext)
        w.write(key, images, exts, meta)
    entry = w.close(manifest=False)["shards"][0]
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_bytes(json.dumps({"content": content, "entry": entry}).encode())
    os.replace(tmp, marker)
    return entry


def shard_task(task: dict, cfg_dict: dict, work: str, out: str, fp: str) -> dict:
    """Executor task: gather shard ``task['index']``'s samples and write it; returns its manifest entry."""
    from .global_pass import kept_keys

    units = task["units"]  # [(uid, offset, n, kept before this unit)]
    alive = np.load(Path(work) / "reduce" / "alive.npy", mmap_mode="r")
    first = units[0][3]
    offsets = np.array([u[1] for u in units] + [units[-1][1] + units[-1][2]], dtype=np.int64)
    chunk = list(
        kept_keys(
            work, [u[0] for u in units], offsets, alive, task["r0"] - first, task["r1"] - first, task["parts"]
        )
    )
    cfg = from_dict(CurateConfig, cfg_dict)
    return write_shard(task["index"], chunk, cfg, Path(work), Path(out), fp)


def shard_plan(
    uids: list[str], offsets: np.ndarray, kept_per_unit: list[int], size: int, parts: int
) -> list[dict]:
    """One task per output shard: its rank range and the units that hold those ranks."""
    before = np.r_[0, np.cumsum(kept_per_unit)].astype(np.int64)  # (U + 1,) kept ranks before unit u
    total = int(before[-1])
    tasks = []
    for i, r0 in enumerate(range(0, total, size)):
        r1 = min(r0 + size, total)
        u0 = int(np.searchsorted(before, r0, side="right")) - 1
        u1 = int(np.searchsorted(before, r1, side="left"))
        units = [
            (uids[u], int(offsets[u]), int(offsets[u + 1] - offsets[u]), int(before[u]))
            for u in range(u0, u1)
        ]
        tasks.append({"index": i, "r0": r0, "r1": r1, "units": units, "parts": parts})
    return tasks


def remove_stale(out: Path, prefix: str, n_shards: int) -> None:
    """Delete output shards numbered ``n_shards`` and up (left by an earlier, larger run), and the
    shards the previous ``manifest.json`` lists under names this run does not write (another prefix)."""
    new = {f"{prefix}-{i:06d}.tar" for i in range(n_shards)}
    old = out / "manifest.json"
    if old.exists():
        try:
            names = [s["name"] for s in json.loads(old.read_text()).get("shards", [])]
        except (ValueError, TypeError, KeyError, AttributeError):
            names = []  # not our manifest: nothing in it is ours to delete
        for name in names:
            p = out / str(name)
            if (
                str(name) not in new
                and p.name == name
                and p.suffix == ".tar"
                and p.is_file()
                and not p.is_symlink()
            ):
                p.unlink()
    for stale in out.glob(f"{prefix}-*.tar"):
        try:
            if int(stale.stem.rsplit("-", 1)[1]) >= n_shards:
                stale.unlink()
        except ValueError:
            continue
