"""The download stage writing webdataset shards (``--output webdataset``), as img2dataset does.

Rows are read in batches of ``shard_rows`` (a shard each, in row order). Shard ``k`` becomes:

- ``shards/{k:05d}.tar``: one sample per row whose image came: ``{key}.{jpg|png|...}`` (the bytes as
  served), ``{key}.txt`` (the row's ``caption_field``, when it has one) and ``{key}.json`` (the row,
  with ``url``, ``key`` and ``status``); keys are ``{k:05d}{row in shard}``;
- ``shards/{k:05d}_failures.jsonl``: one line per row that has no image (key, url, reason, detail);
- ``shards/{k:05d}_stats.json``: the shard's counts, written last: a shard with it is complete.

A rerun skips complete shards and redoes the rest (a killed shard leaves only ``.tmp`` files), so a
killed run resumes without refetching the shards it finished. Each shard fetches its distinct
URLs once; a URL repeated in two shards is fetched in each (a shard holds only its own rows, so its
bytes are not kept for later shards). Each row is judged by its own sha256 against the bytes its
shard fetched: the fetch is refused only when no row of the shard naming the URL expects those
bytes, and a row whose own hash differs is a ``fetch_sha256_mismatch`` failure of that row alone. Curate the shards with
``{kind: webdataset, path: OUT/shards}`` (the ``.txt`` is the caption).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
from collections import Counter
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


def _write_shard(rows: list[dict], k: int, folder: Path, cfg: DownloadConfig) -> Counter:
    """Fetch one shard's URLs and write its tar and failure log; the reasons counted per row."""
    width = len(str(max(cfg.shard_rows - 1, 1)))  # keys sort in row order within the shard
    by_url: dict[str, list[int]] = {}
    reasons: Counter[str] = Counter()
    stem = folder / f"{k:05d}"
    tar_tmp, fail_tmp = stem.with_suffix(".tar.tmp"), folder / f"{k:05d}_failures.jsonl.tmp"
    with tarfile.open(tar_tmp, "w") as tar, open(fail_tmp, "w", encoding="utf-8") as fails:

        def write(i: int, f: Fetched) -> None:
            key = f"{k:05d}{i:0{width}d}"
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
    return reasons


def download_shards(rows_file: Path, out: Path, cfg: DownloadConfig) -> dict:
    """Fetch ``rows_file``'s URLs into webdataset shards under ``out/shards`` (module docstring)."""
    from tqdm.auto import tqdm

    folder = out / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    totals: Counter[str] = Counter()
    n_rows, n_done_now = 0, 0
    bar = tqdm(desc="download shards", unit="shard", dynamic_ncols=True)
    for k, rows in enumerate(iter_row_batches(rows_file, cfg.shard_rows)):
        if k == 0:
            check_columns(rows_file, rows[0], cfg)
        n_rows += len(rows)
        stats = folder / f"{k:05d}_stats.json"
        if stats.exists():  # finished by an earlier run
            totals.update(json.loads(stats.read_text())["reasons"])
            continue
        reasons = _write_shard(rows, k, folder, cfg)
        stats.with_suffix(".tmp").write_text(json.dumps({"rows": len(rows), "reasons": dict(reasons)}))
        os.replace(stats.with_suffix(".tmp"), stats)
        totals.update(reasons)
        n_done_now += 1
        bar.update(1)
    bar.close()
    failed = {k: v for k, v in sorted(totals.items()) if k != "ok"}
    report = {"n_in": n_rows, "n_ok": totals["ok"], "failed": failed, "shards_written_now": n_done_now,
              "shards": str(folder)}  # fmt: skip
    (out / "download_report.json").write_text(json.dumps(report, indent=2))
    return report
