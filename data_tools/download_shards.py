"""The download stage writing webdataset shards (the default output), as img2dataset does.

Rows are read in batches of ``shard_rows`` (a shard each, in row order). Shard ``k`` becomes:

- ``shards/{k:05d}.tar``: one sample per row whose image came: ``{key}.{jpg|png|...}`` (the bytes as
  served), ``{key}.txt`` (the row's ``caption_field``, when it has one) and ``{key}.json`` (the row,
  with ``url``, ``key``, ``status`` and ``sha256``); keys are ``{k:05d}{row in shard}``;
- ``shards/{k:05d}_failures.jsonl``: one line per row that has no image (key, url, reason, detail);
- ``shards/{k:05d}_stats.json``: the shard's counts, written last: a shard with it is complete.

A rerun skips complete shards and redoes the rest (a killed shard leaves only ``.tmp`` files), so a
killed run resumes without refetching the shards it finished; ``retry_failed`` refetches only the
failed rows of complete shards, copying their good samples over unfetched. Each shard fetches its
distinct URLs once; a URL repeated in two shards is fetched in each (a shard holds only its own
rows, so its bytes are not kept for later shards). Each row is judged by its own sha256 against the
bytes its shard fetched: the fetch is refused only when no row of the shard naming the URL expects
those bytes, and a row whose own hash differs is a ``fetch_sha256_mismatch`` failure of that row alone.

Shards are independent tasks (:func:`data_tools.executors.stream_units`), each with its own fetch
loop: one after another in this process by default, ``workers`` at a time in local processes
(``--workers N``; a shard's slowest URLs then no longer hold the next shard back), or on the Ray
cluster curation uses with ``executor="ray"`` (``--executor ray``; every node must see ``out`` at
the same path), at most ``workers`` shards in flight. The driver reads a shard's rows only when a
slot frees up, so its memory stays bounded too. The shards are the same whichever
executor wrote them (same samples under the same keys, same bytes; members in fetch order).
Curate them with ``{kind: webdataset, path: OUT/shards}`` (the ``.txt`` is the caption; the
failure logs bring each failed row's reason into the funnel).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .fetch import (
    DownloadConfig,
    Fetched,
    Fetcher,
    add_expected,
    check_columns,
    expected_sha256,
    iter_row_batches,
    judge_row,
)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _json_safe(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def _shard_key(k: int, i: int, cfg: DownloadConfig) -> str:
    width = len(str(max(cfg.shard_rows - 1, 1)))  # keys sort in row order within the shard
    return f"{k:05d}{i:0{width}d}"


def write_shard(unit: dict, cfg: DownloadConfig) -> dict:
    """One shard task: fetch the rows ``unit["rows"]`` of shard ``unit["k"]`` into ``unit["folder"]``
    and commit its tar, failure log and stats (written last); ``unit["redo"]`` (row numbers) fetches
    only those rows and copies the finished tar's samples over. The reasons counted per row."""
    rows, k, folder = unit["rows"], unit["k"], Path(unit["folder"])
    redo = set(unit["redo"]) if unit.get("redo") is not None else None
    by_url: dict[str, list[int]] = {}
    reasons: Counter[str] = Counter()
    stem = folder / f"{k:05d}"
    tar_tmp, fail_tmp = stem.with_suffix(".tar.tmp"), folder / f"{k:05d}_failures.jsonl.tmp"
    with tarfile.open(tar_tmp, "w") as tar, open(fail_tmp, "w", encoding="utf-8") as fails:
        if redo is not None:  # the rows that came last time: their samples copied, not fetched again
            with tarfile.open(stem.with_suffix(".tar")) as old:
                for m in old:
                    f = old.extractfile(m)
                    tar.addfile(m, f)
            reasons["ok"] += len(rows) - len(redo)

        def write(i: int, f: Fetched) -> None:
            key = _shard_key(k, i, cfg)
            reasons[f.reason] += 1
            if f.reason != "ok":
                line = {"key": key, "url": f.url, "reason": f.reason, "detail": f.detail,
                        "content_type": f.content_type}  # fmt: skip
                fails.write(json.dumps(line) + "\n")
                return
            row = rows[i]
            _add(tar, f"{key}.{f.ext}", f.data)
            caption = row.get(cfg.caption_field)
            if isinstance(caption, str):
                _add(tar, f"{key}.txt", caption.encode("utf-8"))
            meta = {**_json_safe(row), "url": f.url, "key": key, "status": "ok", "sha256": f.sha256}
            _add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))

        hashes: dict[str, frozenset[str] | None] = {}  # per URL, the sha256s its rows in this shard expect
        for i, row in enumerate(rows):
            if redo is not None and i not in redo:
                continue
            url = str(row.get(cfg.url_field) or "")
            if url:
                by_url.setdefault(url, []).append(i)
                add_expected(hashes, url, expected_sha256(row, cfg))
            else:
                write(i, Fetched(url, "fetch_no_url"))

        def done(f: Fetched) -> None:
            for i in by_url[f.url]:
                write(i, judge_row(expected_sha256(rows[i], cfg), f))  # each row by its own sha256

        asyncio.run(Fetcher(cfg, done).run(iter(hashes.items())))
    os.replace(fail_tmp, folder / f"{k:05d}_failures.jsonl")
    os.replace(tar_tmp, stem.with_suffix(".tar"))
    stats = folder / f"{k:05d}_stats.json"
    stats.with_suffix(".tmp").write_text(json.dumps({"rows": len(rows), "reasons": dict(reasons)}))
    os.replace(stats.with_suffix(".tmp"), stats)
    return {"k": k, "reasons": dict(reasons)}


def _failed_rows(folder: Path, k: int) -> list[int]:
    """Row numbers (in shard ``k``) of the rows its failure log lists."""
    lines = (folder / f"{k:05d}_failures.jsonl").read_text(encoding="utf-8").splitlines()
    return sorted(int(json.loads(x)["key"][len(f"{k:05d}") :]) for x in lines if x.strip())


def download_shards(rows_file: Path, out: Path, cfg: DownloadConfig, retry_failed: bool = False,
                    executor: str = "local", workers: int | None = None) -> dict:  # fmt: skip
    """Fetch ``rows_file``'s URLs into webdataset shards under ``out/shards`` (module docstring)."""
    from .executors import stream_units

    folder = out / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    totals: Counter[str] = Counter()
    counted = {"rows": 0, "now": 0}

    def todo() -> Iterator[dict]:
        for k, rows in enumerate(iter_row_batches(rows_file, cfg.shard_rows)):
            if k == 0:
                check_columns(rows_file, rows[0], cfg)
            counted["rows"] += len(rows)
            stats = folder / f"{k:05d}_stats.json"
            redo = None
            if stats.exists():  # finished by an earlier run
                reasons = json.loads(stats.read_text())["reasons"]
                if not retry_failed or reasons.get("ok", 0) == len(rows):
                    totals.update(reasons)
                    continue
                redo = _failed_rows(folder, k)
            yield {"k": k, "rows": rows, "folder": str(folder), "redo": redo}

    for res in stream_units(write_shard, todo(), (cfg,), executor, workers, desc="download shards"):
        totals.update(res["reasons"])
        counted["now"] += 1
    failed = {k: v for k, v in sorted(totals.items()) if k != "ok"}
    report = {"n_in": counted["rows"], "n_ok": totals["ok"], "failed": failed,
              "shards_written_now": counted["now"], "shards": str(folder)}  # fmt: skip
    (out / "download_report.json").write_text(json.dumps(report, indent=2))
    return report
