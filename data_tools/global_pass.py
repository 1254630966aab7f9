"""The global pass (exact dedup, near dedup, CLIP threshold, output keys) without per-sample driver state.

Same decisions as ``curate.reduce_decisions``, which loads every candidate's record into the driver;
here the records stay in the units' ``done.json`` files and executor tasks do the work:

    columns (one task per unit)  done.json -> reduce/cols/{uid}.npz: compact columns, and the sha256s,
                                 output keys and each index table's pHashes split into partitions
    exact   (one task per sha256 partition)  first occurrence of each sha256 in global order
    near    (one task per index table and bucket-key partition)  the pairs within max_distance; the
                                 driver merges them and walks ``greedy_keep`` over paired samples only
    clip    (tasks over unit groups)  exact quantile: 16-bit radix histograms of the scores narrow the
                                 rank to one bucket, whose values come back; then the drops
    keys    (one task per key-root partition)  unique keys; only the renamed ones are written

A candidate of several images (a document's pages) has one row per image in the sha256 and pHash
columns, each naming its candidate: the tasks compare images and return candidates (exact: the
candidates of each repeated sha256, walked by ``greedy_groups``; near: candidate pairs, a candidate
never paired with itself), so a sample goes when any of its images repeats a kept sample's.

Partitions are exact: duplicates share a sha256 prefix, and a key and every ``_N`` rename of it share
the root left after stripping trailing ``_digits``, so no decision crosses a partition. The driver holds
``alive`` (one byte per candidate), the duplicates the tasks return, and per-unit counts; see
docs/CURATION_SCALE.md for the figures.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import zlib
from collections import Counter
from functools import lru_cache
from math import ceil
from pathlib import Path

import numpy as np

from .dedup import bucket_pairs, greedy_groups, greedy_keep, near_detail, pages_of, table_key, table_spans
from .executors import run_units
from .shards import safe_key

PER_PARTITION = 1_000_000  # candidates per exact-dedup / key partition (a few hundred MB in a task)
PER_NEAR_PARTITION = 4_000_000  # hashes per (table, key partition) near-dedup task: ~165 B each
RADIX = 16  # bits of the score's sort key resolved per histogram pass
FETCH = 1 << 16  # a bucket this small sends its values back instead of another histogram


def partitions_for(n_cands: int) -> int:
    """Partition count for a run of ``n_cands`` candidates (at least 4, so small runs use the same path)."""
    return max(4, ceil(n_cands / PER_PARTITION))


def _root(key: str) -> str:
    return re.sub(r"(_\d+)+$", "", key)


def _part_of(strings: list[str], parts: int) -> np.ndarray:
    return np.array([zlib.crc32(s.encode()) % parts for s in strings], dtype=np.int64)


def _cols_path(work: str, uid: str) -> Path:
    return Path(work) / "reduce" / "cols" / f"{uid}.npz"


def _save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def columns_task(task: dict, work: str) -> dict:
    """One unit's candidates -> compact columns and partitioned sha256s and keys; returns the count.

    The sha256 and pHash columns have a row per image; ``sharow``/``nrow`` name each image's candidate.
    """
    cands = json.loads((Path(work) / "units" / f"{task['uid']}.done.json").read_text())["cands"]
    parts = task["parts"]
    owner = np.array([r for r, c in enumerate(cands) for _ in pages_of(c)], dtype=np.int64)  # (P,)
    sha = np.array([sha for c in cands for sha, _ in pages_of(c)], dtype="S64")  # (P,)
    phash = np.array([int(h, 16) for c in cands for _, h in pages_of(c)], dtype=np.uint64)  # (P,)
    keys = [safe_key(f"{c['source']}_{c['id']}") for c in cands]
    cols = {
        "pos": np.array([c["pos"] for c in cands], dtype=np.int64),
        "clip": np.array([np.nan if c["clip"] is None else c["clip"] for c in cands], dtype=np.float64),
        "key": np.array(keys, dtype=str) if keys else np.zeros(0, dtype="U1"),
        **{k: np.array([c[k] for c in cands], dtype=np.int64) for k in ("w", "h", "text_len")},
    }
    sha_part = np.array([int(s[:8], 16) % parts for s in sha], dtype=np.int64)
    key_part = _part_of([_root(k) for k in keys], parts)
    for p in range(parts):
        rows = np.flatnonzero(sha_part == p)
        cols[f"sha{p}"], cols[f"sharow{p}"] = sha[rows], owner[rows]
        cols[f"keyrow{p}"] = np.flatnonzero(key_part == p)
    for t, spans in enumerate(task["tables"]):  # near dedup: each table's hashes by bucket-key partition
        part = table_key(phash, spans) % np.uint64(task["near_parts"])
        for p in range(task["near_parts"]):
            rows = np.flatnonzero(part == np.uint64(p))
            cols[f"nrow{t}_{p}"], cols[f"nhash{t}_{p}"] = owner[rows], phash[rows]
    _save(_cols_path(work, task["uid"]), **cols)
    return {"uid": task["uid"], "n": len(cands)}


def exact_task(task: dict, work: str) -> tuple[np.ndarray, np.ndarray]:
    """Partition ``p``: (candidate global index, group id) of every image whose sha256 is repeated;
    group ids are distinct across partitions (``p + parts * k``)."""
    p, shas, gidx = task["p"], [], []
    for uid, offset in task["units"]:
        with np.load(_cols_path(work, uid)) as z:
            shas.append(z[f"sha{p}"])
            gidx.append(z[f"sharow{p}"] + offset)
    sha, g = np.concatenate(shas), np.concatenate(gidx)  # in global order
    _, inverse, counts = np.unique(sha, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    rep = np.flatnonzero(counts[inverse] > 1)
    return g[rep], p + task["parts"] * inverse[rep]


def near_task(task: dict, work: str, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Table ``t``, key partition ``p``: global candidate pairs (a < b) of surviving images within
    ``max_distance`` bits (two images of one candidate are no pair).

    Two hashes within k bits agree on every band of at least one table, so they share a bucket there;
    a bucket lives in one partition. The union over all (t, p) is every pair, exactly.
    """
    alive = np.load(Path(work) / "reduce" / "alive.npy", mmap_mode="r")
    t, p, hashes, gidx = task["t"], task["p"], [], []
    for uid, offset in task["units"]:
        with np.load(_cols_path(work, uid)) as z:
            rows = z[f"nrow{t}_{p}"]
            keep = np.asarray(alive[offset + rows]) if len(rows) else np.zeros(0, bool)
            hashes.append(z[f"nhash{t}_{p}"][keep])
            gidx.append(rows[keep] + offset)
    g = np.concatenate(gidx)  # non-decreasing: local a < b gives g[a] <= g[b]
    a, b = bucket_pairs(np.concatenate(hashes), task["spans"], max_distance)
    a, b = g[a], g[b]
    return a[a != b], b[a != b]


def _sort_key(scores: np.ndarray) -> np.ndarray:
    """float64 -> uint64 with the same order (flip the sign bit, or every bit of a negative)."""
    bits = scores.view(np.uint64)
    return np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))


def _alive_scores(task: dict, work: str) -> tuple[np.ndarray, np.ndarray]:
    alive = np.load(Path(work) / "reduce" / "alive.npy", mmap_mode="r")
    scores, gidx = [], []
    for uid, offset, n in task["units"]:
        with np.load(_cols_path(work, uid)) as z:
            keep = np.asarray(alive[offset : offset + n])
            scores.append(z["clip"][keep])
            gidx.append(np.flatnonzero(keep) + offset)
    if not scores:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(scores), np.concatenate(gidx)


def clip_task(task: dict, work: str):
    """Over a group of units' surviving scores: a radix histogram, a bucket's values, or the drops."""
    scores, gidx = _alive_scores(task, work)
    if task["op"] == "drop":
        return gidx[scores < task["threshold"]]
    key, shift = _sort_key(scores), task["shift"]
    inside = (key >> np.uint64(shift)) == np.uint64(task["prefix"]) if shift < 64 else np.ones(len(key), bool)
    if task["op"] == "values":
        return np.sort(scores[inside])
    digit = (key[inside] >> np.uint64(shift - RADIX)) & np.uint64((1 << RADIX) - 1)
    return np.bincount(digit.astype(np.int64), minlength=1 << RADIX)


def keys_task(task: dict, work: str) -> int:
    """Partition ``p``: unique keys in global order; writes the renamed ones; returns how many."""
    alive = np.load(Path(work) / "reduce" / "alive.npy", mmap_mode="r")
    p, used, renamed, names = task["p"], set(), [], []
    for uid, offset in task["units"]:
        with np.load(_cols_path(work, uid)) as z:
            rows = z[f"keyrow{p}"]
            rows = rows[np.asarray(alive[offset + rows])] if len(rows) else rows
            for row, base in zip(rows.tolist(), z["key"][rows].tolist()):
                key, n = base, 1
                while key in used:
                    n += 1
                    key = f"{base}_{n}"
                used.add(key)
                if key != base:
                    renamed.append(offset + row)
                    names.append(key)
    out = Path(work) / "reduce" / "keys"
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"g{p}.npy", np.array(renamed, dtype=np.int64))
    np.save(out / f"k{p}.npy", np.array(names, dtype=str) if names else np.zeros(0, dtype="U1"))
    return len(renamed)


class _Records:
    """A few candidates' full records, read from their unit's done.json on demand."""

    def __init__(self, work: str, uids: list[str], offsets: np.ndarray):
        self.work, self.uids, self.offsets = work, uids, offsets

    def __call__(self, g: int) -> tuple[str, dict]:
        u = int(np.searchsorted(self.offsets, g, side="right")) - 1
        uid = self.uids[u]
        cands = _cands(self.work, uid)
        return uid, cands[g - int(self.offsets[u])]


@lru_cache(maxsize=1)
def _cands(work: str, uid: str) -> list[dict]:
    return json.loads((Path(work) / "units" / f"{uid}.done.json").read_text())["cands"]


def _groups(units: list[tuple], size: int) -> list[list[tuple]]:
    return [units[i : i + size] for i in range(0, len(units), size)]


def global_pass(
    units: list[tuple[str, int]],
    cfg,
    work: Path,
    executor: str = "local",
    workers: int | None = None,
    parts: int | None = None,
) -> dict:
    """Exact dedup, near dedup and the CLIP threshold over ``units`` ([(uid, candidates)]); unique keys.

    Returns ``{"offsets", "kept_per_unit", "counts" {(stage, reason): n}, "drops" (the first
    ``report.grid_size`` drop records of each reason, in ``reduce_decisions``' order), "kept_head"
    [(uid, pos, key)] (the first ``grid_size`` kept), "clip_threshold"}``. ``alive`` is left in
    ``work/reduce/alive.npy`` and the renamed keys in ``work/reduce/keys/``, for the shard tasks.
    """
    w, g_max = str(work), cfg.report.grid_size
    uids = [u for u, _ in units]
    sizes = np.array([n for _, n in units], dtype=np.int64)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)  # (U + 1,)
    n = int(offsets[-1])
    parts = parts or partitions_for(n)
    tables = table_spans(cfg.dedup.max_distance, cfg.dedup.bands) if cfg.dedup.near else []
    near_parts = max(2, ceil(n / PER_NEAR_PARTITION))
    layout = {"parts": parts, "tables": tables, "near_parts": near_parts}
    run_units(columns_task, [{"uid": u} | layout for u in uids], (w,), executor, workers, "columns")
    alive = np.ones(n, dtype=bool)
    record = _Records(w, uids, offsets)
    counts: Counter = Counter()
    drops: list[dict] = []

    def note(g: int, stage: str, reason: str, detail) -> None:
        """Count one drop; build its record only while its reason has fewer than grid_size shown."""
        counts[(stage, reason)] += 1
        if counts[(stage, reason)] <= g_max:
            uid, c = record(g)
            drops.append({k: c[k] for k in ("pos", "id", "source", "text")} | {"uid": uid, "stage": stage,
                         "reason": reason, "detail": detail(), "thumb": False, "cand": True})  # fmt: skip

    by_unit = [(u, int(o)) for u, o in zip(uids, offsets[:-1].tolist())]
    if cfg.dedup.exact and n:
        found = run_units(exact_task, [{"p": p, "units": by_unit, "parts": parts} for p in range(parts)],
                          (w,), executor, workers, "exact dedup")  # fmt: skip
        dup, of = greedy_groups(np.concatenate([c for c, _ in found]), np.concatenate([k for _, k in found]))
        alive[dup] = False
        for g, f in zip(dup, of):
            note(g, "exact_dedup", "exact_duplicate", lambda f=f: f"same bytes as {record(f)[1]['id']}")
    if cfg.dedup.near and alive.any():
        _save_alive(work, alive)
        tasks = [
            {"t": t, "p": p, "spans": sp, "units": by_unit}
            for t, sp in enumerate(tables)
            for p in range(near_parts)
        ]
        found = run_units(near_task, tasks, (w, cfg.dedup.max_distance), executor, workers, "near dedup")
        a = np.concatenate([x for x, _ in found])
        b = np.concatenate([y for _, y in found])
        b, a = np.divmod(np.unique(b * max(n, 1) + a), max(n, 1))  # unique, sorted by (b, a)
        nodes = np.unique(np.r_[a, b])  # only samples in some pair; ascending = global order
        keep, dup_of = greedy_keep(len(nodes), np.searchsorted(nodes, a), np.searchsorted(nodes, b))
        del a, b, found
        for j in np.flatnonzero(~keep).tolist():
            g, o = int(nodes[j]), int(nodes[dup_of[j]])
            alive[g] = False
            note(g, "near_dedup", "near_duplicate", lambda g=g, o=o: near_detail(record(g)[1], record(o)[1]))
        del nodes, keep, dup_of
    threshold = None
    groups = _groups(
        [(u, int(o), int(s)) for u, o, s in zip(uids, offsets[:-1], sizes)], max(1, len(uids) // parts)
    )
    if cfg.clip.enabled:
        _save_alive(work, alive)
        if cfg.clip.threshold is not None:
            threshold = float(cfg.clip.threshold)
        elif cfg.clip.quantile is not None and alive.any():
            threshold = _quantile(int(alive.sum()), cfg.clip.quantile, groups, w, executor, workers)
        if threshold is not None:
            found = run_units(clip_task, [{"op": "drop", "threshold": threshold, "units": g} for g in groups],
                              (w,), executor, workers, "clip")  # fmt: skip
            for g in np.concatenate(found).tolist() if found else []:
                alive[g] = False
                note(g, "clip", "clip_low", lambda g=g: _clip_detail(record(g)[1]["clip"], threshold))
    _save_alive(work, alive)
    run_units(keys_task, [{"p": p, "units": by_unit} for p in range(parts)], (w,), executor, workers, "keys")
    kept_per_unit = [int(alive[a:b].sum()) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    head = [(uid, pos, key) for uid, pos, key in kept_keys(w, uids, offsets, alive, 0, g_max, parts)]
    return {"offsets": offsets, "parts": parts, "kept_per_unit": kept_per_unit, "counts": counts,
            "drops": drops, "kept_head": head, "clip_threshold": threshold}  # fmt: skip


def _clip_detail(s: float, threshold: float) -> str:
    return f"CLIP score {s:.4f} < threshold {threshold:.4f}"


def _save_alive(work: Path, alive: np.ndarray) -> None:
    path = work / "reduce" / "alive.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("alive.tmp.npy")
    np.save(tmp, alive)
    os.replace(tmp, path)


def _quantile(n: int, q: float, groups: list, work: str, executor: str, workers: int | None) -> float:
    """``np.quantile(scores, q)`` (linear) of the ``n`` surviving scores, from histograms and two values."""
    virtual = (n - 1) * np.float64(q)
    lo = int(np.floor(virtual))
    hi = min(lo + 1, n - 1)
    a, b = (_order_stat(r, groups, work, executor, workers) for r in (lo, hi))
    gamma = virtual - np.float64(lo)
    diff = np.float64(b) - np.float64(a)
    return float(np.float64(b) - diff * (1 - gamma) if gamma >= 0.5 else np.float64(a) + diff * gamma)


def _order_stat(rank: int, groups: list, work: str, executor: str, workers: int | None) -> float:
    """The ``rank``-th smallest surviving score (0-based), narrowing 16 bits of its sort key per pass."""
    prefix, shift, below = 0, 64, 0
    while True:
        tasks = [{"op": "hist", "prefix": prefix, "shift": shift, "units": g} for g in groups]
        hist = np.sum(run_units(clip_task, tasks, (work,), executor, workers, "clip quantile"), axis=0)
        cum = np.cumsum(hist)
        digit = int(np.searchsorted(cum, rank - below, side="right"))
        below += int(cum[digit - 1]) if digit else 0
        prefix, shift = (prefix << RADIX) | digit, shift - RADIX
        if int(hist[digit]) <= FETCH or shift == 0:
            break
    tasks = [{"op": "values", "prefix": prefix, "shift": shift, "units": g} for g in groups]
    values = np.sort(np.concatenate(run_units(clip_task, tasks, (work,), executor, workers, "clip quantile")))
    return float(values[rank - below])


def kept_keys(work: str, uids: list[str], offsets: np.ndarray, alive: np.ndarray, r0: int, r1: int,
               parts: int):  # fmt: skip
    """(uid, pos, key) of the kept candidates of rank r0 <= r < r1, in global order."""
    renamed = _renamed(work, parts)
    rank = 0
    for u, uid in enumerate(uids):
        a, b = int(offsets[u]), int(offsets[u + 1])
        keep = np.flatnonzero(alive[a:b])
        if rank + len(keep) <= r0:
            rank += len(keep)
            continue
        with np.load(_cols_path(work, uid)) as z:
            pos, key = z["pos"], z["key"]
            for row in keep[max(0, r0 - rank) : r1 - rank].tolist():
                yield uid, int(pos[row]), renamed.get(a + row, str(key[row]))
        rank += len(keep)
        if rank >= r1:
            return


def _renamed(work: str, parts: int) -> dict[int, str]:
    """Global index -> key of every kept candidate whose key got an ``_N`` suffix."""
    out: dict[int, str] = {}
    for p in range(parts):
        d = Path(work) / "reduce" / "keys"
        out.update(zip(np.load(d / f"g{p}.npy").tolist(), np.load(d / f"k{p}.npy").tolist()))
    return out


def report_view(work: Path, uids: list[str], kept_head: list[tuple], threshold: float | None, cfg) -> dict:
    """What the report shows of the candidates, read unit by unit from the columns.

    ``{"clip", "text_len", "w", "h"}`` arrays over every candidate (histograms), ``"kept"`` [(uid, pos,
    key, text)] for ``kept_head``, and ``"border"`` [(uid, pos, clip, text)]: the ``grid_size``
    candidates nearest the threshold within ``report.borderline``, nearest first.
    """
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("clip", "text_len", "w", "h")}
    near: list[tuple[float, tuple[str, int]]] = []
    g = cfg.report.grid_size
    for uid in uids:
        with np.load(_cols_path(str(work), uid)) as z:
            for k in cols:
                cols[k].append(z[k])
            if threshold is not None:
                diff = np.abs(z["clip"] - threshold)
                rows = np.flatnonzero(diff <= cfg.report.borderline)  # NaN (no score) never passes
                near = heapq.nsmallest(g, near + [(float(diff[r]), (uid, int(z["pos"][r]))) for r in rows])
    view = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    view["clip"] = view["clip"][~np.isnan(view["clip"])]

    def record(uid: str, pos: int) -> dict:
        return next(c for c in _cands(str(work), uid) if c["pos"] == pos)

    view["kept"] = [(u, p, key, record(u, p)["text"]) for u, p, key in kept_head]
    view["border"] = [(u, p, record(u, p)["clip"], record(u, p)["text"]) for _, (u, p) in near]
    return view
