"""Curation: raw inputs -> clean webdataset shards + report, resumable and parallel.

    plan units ──map (process_unit, per unit, in parallel)──▶ work/units/uXXXXXX.{tar,done.json}
               ──reduce (dedup, CLIP threshold, keys: partitioned tasks, global_pass.py)──▶ decisions
               ──write (one task per output shard, shard_tasks.py)──▶ out/{prefix}-NNNNNN.tar + manifest.json
               ──report──▶ out/report/report.html + PNGs

Every map stage is a pure function of one unit's records; every sample it drops gets a reason
code, so ``in == kept + sum(dropped)``. A unit commits its stage tar and then its done-marker with
``os.replace``; an output shard is committed with a marker naming its exact content. A rerun
skips committed work, and because every decision is a deterministic function of the inputs and
the config, an interrupted-then-resumed run writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmsmall import faults
from mmsmall.config import ConfigError, from_dict, to_dict
from mmsmall.data.remote import is_remote

from .config import CurateConfig, load_curate_config
from .decontam import DecontamIndex, hit_record
from .dedup import (
    NearDupIndex,
    greedy_groups,
    greedy_keep,
    hex64,
    near_detail,
    pages_of,
    phash_batch,
    phash_thumb,
)
from .executors import run_units, session
from .ingest import plan_units, read_unit
from .points import normalize_page_points, pointing_messages
from .shard_tasks import StageReader, remove_stale, write_shard
from .shards import _add_member, safe_key, write_manifest
from .textfilters import text_filter
from .validate import decode_validate, normalize_image

log = logging.getLogger(__name__)

# Stage order of the funnel; every reason code belongs to one stage.
STAGES = ("ingest", "validate", "points", "text", "decontam", "exact_dedup", "near_dedup", "clip")
THUMB = 160  # px, longer side of report thumbnails stored for dropped samples


def config_fingerprint(cfg: CurateConfig) -> str:
    """Hash of everything that changes what a unit produces (not output paths or report)."""
    d = to_dict(cfg)
    for k in ("out_dir", "work_dir", "shard_size", "report", "name"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _thumb_bytes(im: Image.Image) -> bytes:
    t = im.copy()
    t.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    t.convert("RGB").save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _short(messages: list[dict], n: int = 120) -> str:
    text = " | ".join(m.get("content", "") for m in messages if m.get("role") == "assistant")
    return text[:n]


# Header-level drops whose pixels are safe to decode for a report thumbnail (not bombs).
_SAFE_TO_PREVIEW = ("too_small", "aspect", "animated")


def _preview(data: bytes) -> Image.Image | None:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # the first frame of an animation
        return im
    except Exception:  # noqa: BLE001 - a preview is optional
        return None


@lru_cache(maxsize=2)
def _decontam_index(path: str, stamp: str) -> DecontamIndex:
    """The saved index, cached per worker by its stamp's content (a rebuilt index is reloaded)."""
    return DecontamIndex.load(path)


# ----------------------------------------------------------------------------- map


def _check_pages(rec: dict, cfg: CurateConfig, draft: tuple[int, int]) -> dict:
    """Decode, validate and normalize each image of a record, stopping at the first bad one.

    Returns ``{"pages": [{"thumb", "data", "ext", "size", "served"}], "im"}`` for the good images so
    far (``thumb``: the (32, 32) pHash thumbnail; ``im``: the first image, the only decoded one kept,
    so a unit of long documents holds one image per sample), and for a bad one ``reason, stage,
    detail`` (``image i of n: ...`` for several) and its bytes ``raw``.
    """
    blobs = rec["images"] if rec["images"] is not None else [rec["image_bytes"]]
    pages: list[dict] = []
    first = None
    for i, raw in enumerate(blobs):
        where = f"image {i} of {len(blobs)}: " if len(blobs) > 1 else ""
        bad = {"pages": pages, "im": first, "stage": "validate", "raw": raw}
        im, reason, info = decode_validate(raw, cfg.validate, draft)
        if reason is not None:
            return bad | {"reason": reason, "detail": where + info}
        served = im.info.get("full_size", im.size)  # the size pixel coordinates refer to (before any resize)
        try:
            im, data, ext, size = normalize_image(im, raw, info, cfg.normalize)
        except Exception as e:  # noqa: BLE001 - e.g. malformed EXIF: a bad sample, never a crashed unit
            return bad | {"reason": "normalize_failed", "detail": f"{where}{type(e).__name__}: {e}"}
        if (served[0] > served[1]) != (size[0] > size[1]):  # turned upright by its EXIF orientation
            served = served[::-1]
        pages.append({"thumb": phash_thumb(im), "data": data, "ext": ext, "size": size, "served": served})
        first = im if first is None else first
    return {"pages": pages, "im": first, "reason": None}


def _check_sample(rec: dict, cfg: CurateConfig, draft: tuple[int, int]) -> dict:
    """Ingest error, decode/validate/normalize of every image, points and text checks of one record.

    Returns ``{"reason", "stage", "detail", "im", "raw"}`` (``im``: the first image, for thumbnails and
    CLIP) plus ``pages`` when it passes. A sample with any bad image is dropped whole, with that reason.
    """
    out = {"reason": rec["error"], "stage": "ingest", "detail": rec["image_ref"], "im": None,
           "raw": rec["image_bytes"]}  # fmt: skip
    if out["reason"] is not None:
        return out
    chk = _check_pages(rec, cfg, draft)
    pages = chk.pop("pages")
    out.update(im=chk.pop("im"), pages=pages)
    if chk["reason"] is not None:
        return out | chk
    if rec["points"] is not None:
        pts, reason, detail = normalize_page_points(
            rec["points"], rec["meta"].pop("coords", "normalized"), [p["served"] for p in pages]
        )
        if reason is not None:
            return out | {"reason": reason, "stage": "points", "detail": detail}
        rec["points"] = pts
        if not rec["messages"]:
            rec["messages"] = pointing_messages(pts)
        if not rec["messages"]:
            return out | {"reason": "text_empty", "stage": "text", "detail": "no labels and no messages"}
        return out
    reason, detail = text_filter(rec["messages"], cfg.text)
    return out | {"reason": reason, "stage": "text", "detail": detail}


def _decontaminate(cands: list[dict], hashes: np.ndarray, cfg: CurateConfig, work_dir: str):
    """Split candidates into (kept, [(cand, reason, detail)], hits) against the eval index; ``hashes``
    holds every image of every candidate in order, and one matching image drops its whole sample."""
    work = Path(work_dir)
    index = _decontam_index(str(work / "decontam"), (work / "decontam.fingerprint").read_text())
    page_hits = index.check_images(hashes) if cfg.decontam.images else {}
    first = np.cumsum([0] + [len(c["pages"]) for c in cands]).tolist()
    kept, dropped, hits = [], [], []
    for n, c in enumerate(cands):
        hit = next((i for i in range(first[n], first[n + 1]) if i in page_hits), None)
        if hit is not None:
            ref, dist = page_hits[hit]
            where = f"image {hit - first[n]}: " if len(c["pages"]) > 1 else ""
            kind, reason, detail = "image", "decontam_image", f"{where}pHash within {dist} bits of {ref}"
        elif cfg.decontam.text and (t := index.check_text(c["rec"]["messages"])) is not None:
            ref, kind, reason, detail = t[0], "text", "decontam_text", f"question overlaps {t[0]}: {t[1]!r}"
        else:
            kept.append(c)
            continue
        dropped.append((c, reason, detail))
        hits.append(hit_record(c["id"], c["source"], kind, ref, detail))
    return kept, dropped, hits


def _sample_json(c: dict, score: float | None) -> dict:
    """The shard json of a candidate: ``image`` for one image, ``images`` (in order) for several."""
    rec = c["rec"]
    images = [
        {"width": p["size"][0], "height": p["size"][1], "sha256": p["sha256"], "phash": hex64(p["phash"])}
        for p in c["pages"]
    ]
    return {
        "id": rec["id"],
        "source": rec["source"],
        **({"image": images[0]} if len(images) == 1 else {"images": images}),
        "task": rec["task"],
        "messages": rec["messages"],
        "points": rec["points"] if rec["points"] is not None else [],
        "meta": {**rec["meta"], **({"clip_score": score} if score is not None else {})},
    }


def file_stat(path: str) -> list[int] | None:
    """(size, mtime in ns) of a file, None when it is missing: what a rerun compares."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def changed_reads(reads: dict[str, list[int] | None]) -> list[str]:
    """The recorded input files whose size or mtime differ now (or that appeared or disappeared)."""
    return [p for p, st in reads.items() if file_stat(p) != st]


def unit_key(unit: dict, fingerprint: str, bench: str) -> str:
    """What a unit's result depends on besides the files it reads: the config, the decontam
    index and the unit's plan (its rows, or its file and row range)."""
    plan = {k: v for k, v in unit.items() if k not in ("uid", "key")}
    blob = json.dumps([fingerprint, bench, plan], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finished_unit(units_dir: Path, unit: dict) -> dict | None:
    """The stats of ``unit`` when its done-marker has the unit's key and every file it read is unchanged."""
    done = units_dir / f"{unit['uid']}.done.json"
    if not done.exists():
        return None
    stats = json.loads(done.read_text())
    if stats.get("key") != unit["key"] or changed_reads(stats.get("reads", {})):
        return None
    return stats


def _source_files(unit: dict, cfg: CurateConfig) -> list[str]:
    """Local files a unit reads besides its images: its tar or parquet file, a local HF dataset folder."""
    inp = cfg.inputs[unit["input"]]
    if "file" in unit and not is_remote(unit["file"]):
        return [unit["file"]]
    if inp.kind in ("hf", "pixmo") and Path(inp.path).exists():
        root = Path(inp.path)
        files = [root] if root.is_file() else root.rglob("*")
        return sorted(str(f) for f in files if f.is_file() and not f.name.startswith("."))
    return []


def process_unit(unit: dict, cfg_dict: dict, work_dir: str) -> dict:
    """Run every per-sample stage on one unit and commit its stage tar and done-marker.

    The stage tar holds each surviving candidate as ``s{pos}.{jpg|png}`` (several images:
    ``s{pos}.0.jpg``, ``s{pos}.1.png``, ...) + ``s{pos}.json`` (its final sample json) and report
    thumbnails of dropped samples as ``d{pos}.jpg`` (a sample's first image); the marker
    ``{uid}.done.json`` holds counts, drops with reasons, and per-candidate hashes and scores.
    """
    cfg = from_dict(CurateConfig, cfg_dict)
    units_dir = Path(work_dir) / "units"
    done = units_dir / f"{unit['uid']}.done.json"
    if (stats := finished_unit(units_dir, unit)) is not None:
        return stats
    # stat before reading: a file changed while it is read then differs at the next run
    reads = {f: file_stat(f) for f in _source_files(unit, cfg)}
    drops: list[dict] = []
    cands: list[dict] = []
    thumbs: dict[str, bytes] = {}
    per_reason: Counter = Counter()

    def drop(
        pos: int, base: dict, stage: str, reason: str, detail: str, im, raw: bytes | None = None
    ) -> None:
        per_reason[reason] += 1
        if per_reason[reason] <= cfg.report.grid_size:
            if im is None and raw is not None and reason in _SAFE_TO_PREVIEW:
                im = _preview(raw)
            if im is not None:
                thumbs[f"d{pos:06d}"] = _thumb_bytes(im)
        has_thumb = f"d{pos:06d}" in thumbs
        drops.append(
            {**base, "stage": stage, "reason": reason, "detail": str(detail)[:200], "thumb": has_thumb}
        )

    # decode JPEGs at a reduced DCT scale when only thumbnails are needed (pHash, CLIP, report)
    draft = (224, 224) if cfg.clip.enabled else (96, 96)
    n_in = 0
    for pos, rec in enumerate(read_unit(unit, cfg)):
        n_in += 1
        for f in rec["files"] + ([rec["file"]] if rec["file"] is not None else []):
            reads[f] = file_stat(f)
        try:
            chk = _check_sample(rec, cfg, draft)
        except Exception as e:  # noqa: BLE001 - last guard: one record never stops a run
            chk = {
                "reason": "record_error",
                "stage": "ingest",
                "detail": f"{type(e).__name__}: {e}",
                "im": None,
            }
        base = {"pos": pos, "id": rec["id"], "source": rec["source"], "text": _short(rec["messages"])}
        if chk["reason"] is not None:
            drop(pos, base, chk["stage"], chk["reason"], chk["detail"], chk["im"], chk.get("raw"))
        else:
            cands.append(base | {"rec": rec, "im": chk["im"], "pages": chk["pages"]})

    # (P, 32, 32) thumbnails of every image of every candidate -> (P,) 64-bit pHashes, one batched DCT
    pages = [p for c in cands for p in c["pages"]]
    hashes = phash_batch(np.stack([p.pop("thumb") for p in pages])) if pages else np.zeros(0, np.uint64)
    for p, h in zip(pages, hashes.tolist()):
        p["phash"], p["sha256"] = h, hashlib.sha256(p["data"]).hexdigest()

    hits: list[dict] = []
    if cfg.decontam.benchmarks:
        cands, dropped, hits = _decontaminate(cands, hashes, cfg, work_dir)
        for c, reason, detail in dropped:
            drop(
                c["pos"],
                {k: c[k] for k in ("pos", "id", "source", "text")},
                "decontam",
                reason,
                detail,
                c["im"],
            )

    scores: list[float | None] = [None] * len(cands)
    if cfg.clip.enabled and cands:
        from .clipscore import ClipScorer, clip_text

        texts = [clip_text(c["rec"]["messages"], c["rec"]["task"]) for c in cands]
        scores = ClipScorer(cfg.clip, cfg.seed).score([c["im"] for c in cands], texts)

    # commit: stage tar first, then the done-marker
    units_dir.mkdir(parents=True, exist_ok=True)
    tar_path = units_dir / f"{unit['uid']}.tar"
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    cand_stats = []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for c, score in zip(cands, scores):
            sample = _sample_json(c, score)
            pages = c["pages"]
            for i, p in enumerate(pages):  # s{pos}.jpg, or s{pos}.0.jpg, s{pos}.1.png, ... for several
                _add_member(tar, f"s{c['pos']:06d}{f'.{i}' if len(pages) > 1 else ''}.{p['ext']}", p["data"])
            _add_member(
                tar, f"s{c['pos']:06d}.json", json.dumps(sample, sort_keys=True, ensure_ascii=False).encode()
            )
            answer = " ".join(m["content"] for m in sample["messages"] if m["role"] == "assistant")
            first = pages[0]
            cand_stats.append(
                {k: c[k] for k in ("pos", "id", "source", "text")}
                | {"ext": first["ext"], "sha256": first["sha256"], "phash": hex64(first["phash"])}
                | {"clip": score, "w": first["size"][0], "h": first["size"][1], "text_len": len(answer)}
                | ({"pages": [[p["sha256"], hex64(p["phash"])] for p in pages]} if len(pages) > 1 else {})
            )
        for name, data in thumbs.items():
            _add_member(tar, f"{name}.jpg", data)
    os.replace(tmp, tar_path)
    stats = {
        "uid": unit["uid"],
        "key": unit["key"],
        "reads": reads,
        "digest": hashlib.sha256(json.dumps([unit["key"], reads], sort_keys=True).encode()).hexdigest()[:16],
        "n_in": n_in,
        "drops": drops,
        "cands": cand_stats,
        "hits": hits,
    }
    _atomic_write(done, json.dumps(stats, sort_keys=True).encode())
    delay = faults.unit_delay_s()  # tests: widen the kill window
    if delay:
        time.sleep(delay)
    return stats


# ----------------------------------------------------------------------------- reduce


def reduce_decisions(stats: list[dict], cfg: CurateConfig) -> dict:
    """Global pass: exact dedup, near dedup, CLIP threshold; assign unique output keys.

    Returns ``{"kept": [(uid, pos, key)], "drops": [drop dicts with uid], "clip_threshold": float|None}``.
    """
    flat = [(s["uid"], c) for s in stats for c in s["cands"]]
    alive = np.ones(len(flat), dtype=bool)
    drops: list[dict] = []

    def drop(i: int, stage: str, reason: str, detail: str) -> None:
        alive[i] = False
        uid, c = flat[i]
        drops.append({k: c[k] for k in ("pos", "id", "source", "text")} | {"uid": uid, "stage": stage,
                     "reason": reason, "detail": detail, "thumb": False, "cand": True})  # fmt: skip

    if cfg.dedup.exact:  # every image of every candidate; a sample repeating a kept one's image goes
        owner = np.array([i for i, (_, c) in enumerate(flat) for _ in pages_of(c)], dtype=np.int64)
        shas = np.array([sha for _, c in flat for sha, _ in pages_of(c)], dtype="S64")
        _, group = np.unique(shas, return_inverse=True)
        for i, f in zip(*greedy_groups(owner, group.reshape(-1))):
            drop(i, "exact_dedup", "exact_duplicate", f"same bytes as {flat[f][1]['id']}")
    if cfg.dedup.near:
        idx = np.flatnonzero(alive)
        owner = np.array([j for j, i in enumerate(idx) for _ in pages_of(flat[i][1])], dtype=np.int64)
        hashes = np.array([int(h, 16) for i in idx for _, h in pages_of(flat[i][1])], dtype=np.uint64)
        a, b = NearDupIndex(hashes, cfg.dedup.max_distance, cfg.dedup.bands).self_pairs()
        a, b = owner[a], owner[b]  # image pairs -> sample pairs (a <= b: a sample's images are adjacent)
        pairs = np.unique(np.stack([a[a != b], b[a != b]]), axis=1)
        keep, dup_of = greedy_keep(len(idx), pairs[0], pairs[1])
        for j in np.flatnonzero(~keep).tolist():
            c, other = flat[idx[j]][1], flat[idx[dup_of[j]]][1]
            drop(int(idx[j]), "near_dedup", "near_duplicate", near_detail(c, other))
    threshold = None
    if cfg.clip.enabled:
        idx = np.flatnonzero(alive)
        scores = np.array([flat[i][1]["clip"] for i in idx], dtype=np.float64)
        if cfg.clip.threshold is not None:
            threshold = float(cfg.clip.threshold)
        elif cfg.clip.quantile is not None and len(scores):
            threshold = float(np.quantile(scores, cfg.clip.quantile))
        if threshold is not None:
            for i, s in zip(idx.tolist(), scores.tolist()):
                if s < threshold:
                    drop(i, "clip", "clip_low", f"CLIP score {s:.4f} < threshold {threshold:.4f}")
    kept, used = [], set()
    for i in np.flatnonzero(alive).tolist():
        uid, c = flat[i]
        key = base = safe_key(f"{c['source']}_{c['id']}")
        n = 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        kept.append((uid, c["pos"], key))
    return {"kept": kept, "drops": drops, "clip_threshold": threshold}


# ----------------------------------------------------------------------------- write


def write_shards(
    kept: list[tuple[str, int, str]], cfg: CurateConfig, work: Path, out: Path, fp: str
) -> list[dict]:
    """Write the kept samples into fixed-size shards in this process (the reference for the shard tasks)."""
    reader = StageReader(work / "units")
    chunks = [kept[s : s + cfg.shard_size] for s in range(0, len(kept), cfg.shard_size)]
    entries = [write_shard(i, chunk, cfg, work, out, fp, reader) for i, chunk in enumerate(chunks)]
    remove_stale(out, cfg.prefix, len(chunks))
    return entries


def partitioned_reduce_and_write(
    stats: list[dict], cfg: CurateConfig, work: Path, out: Path, fp: str, executor: str, workers: int | None
) -> tuple[dict, list[dict]]:
    """``reduce_decisions`` + ``write_shards`` as executor tasks: same decisions, same bytes.

    Returns (decisions, shard entries); decisions carry the counts of the global pass's drops, its first
    ``report.grid_size`` drop records per reason and the first kept samples, not every sample.
    """
    from .global_pass import global_pass
    from .shard_tasks import shard_plan, shard_task

    uids = [s["uid"] for s in stats]
    g = global_pass([(s["uid"], s["n_cands"]) for s in stats], cfg, work, executor, workers)
    plan = shard_plan(uids, g["offsets"], g["kept_per_unit"], cfg.shard_size, g["parts"])
    entries = run_units(
        shard_task, plan, (to_dict(cfg), str(work), str(out), fp), executor, workers, "shards"
    )
    remove_stale(out, cfg.prefix, len(plan))
    dec = {"kept": g["kept_head"], "n_kept": sum(g["kept_per_unit"]), "drops": g["drops"],
           "counts": g["counts"], "clip_threshold": g["clip_threshold"], "parts": g["parts"]}  # fmt: skip
    return dec, entries


def unit_task(unit: dict, cfg_dict: dict, work_dir: str) -> dict:
    """``process_unit`` on a worker, returning only what the driver keeps (``slim_stats``)."""
    return slim_stats(process_unit(unit, cfg_dict, work_dir), cfg_dict["report"]["grid_size"])


def _by_reason(counts: Counter) -> Counter:
    out: Counter = Counter()
    for (_, reason), n in counts.items():
        out[reason] += n
    return out


def slim_stats(st: dict, shown: int) -> dict:
    """What the driver keeps of a unit's done-marker: counts, and the first ``shown`` drops of each reason.

    Per-candidate records stay on disk (the global pass and the report read them there), so the
    driver's share of a unit does not grow with its samples.
    """
    head, seen = [], Counter()
    for d in st["drops"]:
        seen[(d["stage"], d["reason"])] += 1
        if seen[(d["stage"], d["reason"])] <= shown:
            head.append(d)
    keep = {k: st[k] for k in ("uid", "digest", "n_in", "hits")}
    return keep | {"n_cands": len(st["cands"]), "drops": head, "drop_counts": seen}


# ----------------------------------------------------------------------------- driver


def run_curation(
    config: str | Path | dict | CurateConfig,
    overrides: list[str] | tuple[str, ...] = (),
    executor: str = "local",
    workers: int | None = None,
) -> dict:
    """Curate the config's inputs into shards under ``out_dir``; returns the summary.

    Summary keys: ``out_dir, manifest, report, n_in, n_kept, dropped {reason: n},
    funnel [{stage, reason, count}], clip_threshold, decontam_hits, units, units_resumed``.
    """
    from .executors import EXECUTORS

    if executor not in EXECUTORS:  # before any unit is planned or read
        raise ConfigError(f"--executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    cfg = _absolute_paths(load_curate_config(config, overrides))
    out = Path(cfg.out_dir)
    work = Path(cfg.work_dir) if cfg.work_dir else out / "_work"
    units = plan_units(cfg)  # a missing input fails here, before any folder is made
    (work / "units").mkdir(parents=True, exist_ok=True)
    fp = config_fingerprint(cfg)
    bench = _decontam_stamp(cfg, work)
    todo, stats_by_uid, redone = [], {}, []
    for u in units:
        u["key"] = unit_key(u, fp, bench)
        if (st := finished_unit(work / "units", u)) is not None:
            stats_by_uid[u["uid"]] = slim_stats(st, cfg.report.grid_size)
        else:
            todo.append(u)
            if (work / "units" / f"{u['uid']}.done.json").exists():
                redone.append(u["uid"])
    if redone:
        log.info("curate: %d unit(s) redone, their inputs or config changed: %s", len(redone), redone[:10])
    resumed = len(stats_by_uid)
    with session(executor, workers):  # one pool / Ray connection for the units, the global pass, the shards
        for st in run_units(unit_task, todo, (to_dict(cfg), str(work)), executor, workers, desc="curate"):
            stats_by_uid[st["uid"]] = st
        stats = [stats_by_uid[u["uid"]] for u in units]
        # shards are reused only when every unit's inputs are those they were written from
        run_fp = hashlib.sha256(json.dumps([fp, [s["digest"] for s in stats]]).encode()).hexdigest()[:16]
        dec, entries = partitioned_reduce_and_write(stats, cfg, work, out, run_fp, executor, workers)

    all_drops = [d | {"uid": s["uid"]} for s in stats for d in s["drops"]] + dec["drops"]
    counts = sum((s["drop_counts"] for s in stats), Counter()) + dec["counts"]
    n_in = sum(s["n_in"] for s in stats)
    funnel = [
        {"stage": st, "reason": r, "count": counts[(st, r)]}
        for st in STAGES
        for (s2, r) in sorted(counts)
        if s2 == st
    ]
    dropped = dict(sorted(_by_reason(counts).items()))
    hits = [h for s in stats for h in s["hits"]]
    per_input = Counter()
    for u, s in zip(units, stats):
        per_input[u["input"]] += s["n_in"]
    warnings = [
        f"inputs[{i}] ({inp.kind} {inp.path}) gave no samples; check its path and kind"
        for i, inp in enumerate(cfg.inputs)
        if per_input[i] == 0
    ]
    for w in warnings:
        log.warning("curate: %s", w)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "out_dir": str(out),
        "n_in": n_in,
        "n_kept": dec["n_kept"],
        "dropped": dropped,
        "funnel": funnel,
        "clip_threshold": dec["clip_threshold"],
        "decontam_hits": len(hits),
        "decontam_benchmarks": _decontam_counts(work) if cfg.decontam.benchmarks else {},
        "units": len(units),
        "units_resumed": resumed,
        "units_redone": len(redone),
        "warnings": warnings,
    }
    if n_in != summary["n_kept"] + sum(dropped.values()):
        raise RuntimeError(f"curation lost samples: in={n_in}, kept={summary['n_kept']}, dropped={dropped}")
    manifest = write_manifest(
        out, entries, {"name": cfg.name, "curation": {k: summary[k] for k in ("n_in", "n_kept", "dropped")}}
    )
    summary["manifest"] = str(out / "manifest.json")
    summary["total"] = manifest["total"]
    if cfg.report.enabled:
        from .global_pass import report_view
        from .report import write_curation_report

        view = report_view(work, [s["uid"] for s in stats], dec["kept"], dec["clip_threshold"], cfg)
        summary["report"] = str(
            write_curation_report(out / "report", cfg, summary, view, dec, all_drops, hits, work / "units")
        )
    (out / "curation_summary.json").write_text(json.dumps(summary, indent=2))
    if not cfg.keep_work:
        uids = [u["uid"] for u in units]
        remove_work(
            work, written_files(work, uids, dec["parts"], len(entries), bool(cfg.decontam.benchmarks))
        )
    return summary


def _decontam_counts(work: Path) -> dict:
    """Benchmark -> {items, images, questions} indexed, from the stamp of the index in use."""
    stamp = work / "decontam.fingerprint"
    return json.loads(stamp.read_text()).get("counts", {}) if stamp.exists() else {}


def _decontam_stamp(cfg: CurateConfig, work: Path) -> str:
    """Build the decontamination index unless the stamp shows the same config and unchanged
    benchmark files (every file under each benchmark path and every image it read); returns the
    stamp's digest, part of every unit's key, so changed benchmarks redo the units' decisions."""
    if not cfg.decontam.benchmarks:
        return ""
    stamp = work / "decontam.fingerprint"
    config = hashlib.sha256(json.dumps(to_dict(cfg.decontam), sort_keys=True).encode()).hexdigest()
    old = json.loads(stamp.read_text()) if stamp.exists() else {}
    if not (
        isinstance(old, dict) and old.get("config") == config and not changed_reads(old.get("reads", {}))
    ):
        index, reads = DecontamIndex.build(cfg.decontam)
        index.save(work / "decontam")
        old = {"config": config, "reads": {f: file_stat(f) for f in reads}, "counts": index.counts}
        _atomic_write(stamp, json.dumps(old, sort_keys=True).encode())
    return hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]


def written_files(work: Path, uids: list[str], parts: int, n_shards: int, decontam: bool) -> list[Path]:
    """Every file this run wrote (or would have) under ``work``, named from its own plan."""
    files = [work / "units" / f"{u}{ext}" for u in uids for ext in (".tar", ".done.json")]
    files += [work / "reduce" / "cols" / f"{u}.npz" for u in uids]
    files += [work / "shards" / f"{i:06d}.json" for i in range(n_shards)]
    files += [work / "reduce" / "keys" / f"{g}{p}.npy" for p in range(parts) for g in "gk"]
    files.append(work / "reduce" / "alive.npy")
    if decontam:
        files += [work / f"decontam{ext}" for ext in (".npy", ".json", ".fingerprint")]
    return files


def remove_work(work: Path, written: list[Path]) -> None:
    """Delete the run's own stage files (and their temporary names), then each folder of ``work``
    that is left empty; a file the run did not write is never deleted, whatever its name."""
    for f in written:
        for g in (f, f.with_name(f.name + ".tmp")):
            if g.is_file() and not g.is_symlink():
                g.unlink()
    for d in (work / "units", work / "shards", work / "reduce" / "cols", work / "reduce" / "keys",
              work / "reduce", work):  # fmt: skip
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _absolute_paths(cfg: CurateConfig) -> CurateConfig:
    """Resolve every path against the driver's working directory (workers may run elsewhere)."""

    def absolute(p: str | None) -> str | None:
        return str(Path(p).expanduser().resolve()) if p else p

    for inp in cfg.inputs:
        hub_id = inp.kind in ("hf", "pixmo") and not Path(inp.path).exists()  # an hf hub id stays as given
        if not hub_id and not is_remote(inp.path):  # so do http(s):// and pipe: shards
            inp.path = absolute(inp.path)
        inp.downloads = absolute(inp.downloads) or ""
        if (
            inp.hold_out and Path(inp.hold_out).exists()
        ):  # a local copy of the eval set; a hub id stays as given
            inp.hold_out = absolute(inp.hold_out) or ""
        inp.captions, inp.image_root = absolute(inp.captions), absolute(inp.image_root)
    for b in cfg.decontam.benchmarks:
        b.path = absolute(b.path)
    cfg.out_dir = absolute(cfg.out_dir)
    cfg.work_dir = absolute(cfg.work_dir) or ""
    return cfg
