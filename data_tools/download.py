"""Image URL download stage: rows carrying URLs (PixMo, LAION/DataComp parquet) become local images.

``download(rows_file, out_dir, cfg)`` streams a parquet / jsonl / csv file of rows with a URL
column (and an optional sha256 column) in batches, never whole, fetches each distinct URL with
``aiohttp`` (``concurrency`` workers drawing from a short queue, so URLs in flight stay bounded;
``per_host`` caps one host) and writes, by default (``output="webdataset"``), webdataset shards as
img2dataset does: ``out_dir/shards/{k:05d}.tar`` (image + ``.txt`` caption + the row's ``.json``
per sample), a failure log and a stats file per shard, resumable per shard, one shard after another
in this process, ``workers`` shards at a time in local processes, or as Ray tasks
(``executor="ray"``): see :mod:`data_tools.download_shards`.

With ``output="files"`` (``--output files``) it writes loose files instead, each distinct URL
fetched once per run:

- ``out_dir/images/ab/abcdef....{ext}``: the fetched images, named by the sha256 of their URL;
- ``out_dir/fetch_log.jsonl``: one line per finished URL (``ok`` or a failure reason), appended as
  results arrive, so a killed run resumes without refetching what it already has or tried;
- ``out_dir/images.jsonl``: every input row with ``image`` set to its local file, or with
  ``_error`` set to the failure reason (curation then drops it under that reason, so the reason
  shows in the funnel and the HTML report): curate it with ``{kind: jsonl, path: out_dir/images.jsonl}``.

Both write ``out_dir/download_report.json``: counts in, ok and per failure reason.

Each row is judged by its own sha256: a URL is fetched once per run however many rows name it (the
rows are read through once before fetching, collecting per URL the hashes its rows expect), its
bytes are refused at fetch time (``fetch_sha256_mismatch`` in the log) only when no row naming it
expects them, and each row whose own sha256 differs from the fetched bytes' gets
``fetch_sha256_mismatch`` in ``images.jsonl`` whatever the other rows of its URL expect, and in
whichever batch of the stream it comes.

A rerun fetches only URLs that have no log entry (shards: only unfinished shards);
``retry_failed=True`` (``--retry-failed``) also fetches the URLs whose last attempt failed (shards:
the failed rows of finished shards), and nothing else.

The decoded bytes decide what an image is, not the Content-Type header (S3 serves images as
``binary/octet-stream``, many hosts send none): a body PIL reads is kept whatever its type, and the
type is kept in the log (``content_type``). Every attempt has a deadline (``deadline_s``, connect
plus the whole body) besides the wait for the next bytes (``read_timeout_s``), so a host that
drips a byte at a time cannot hold a slot.

Failure reasons: ``fetch_http_<status>``, ``fetch_timeout`` (no bytes for ``read_timeout_s``, or
the attempt past ``deadline_s``), ``fetch_connect_error``, ``fetch_truncated`` (the connection
closed before the body Content-Length announced), ``fetch_too_large`` (Content-Length over the
cap, or the streamed body passing it), ``fetch_not_image`` (the body does not decode and the server
called it something other than an image, e.g. an HTML error page), ``fetch_undecodable`` (the body
does not decode though served as an image or with no type), ``fetch_sha256_mismatch``,
``fetch_too_many_redirects``, ``fetch_bad_url``, ``fetch_no_url``. 429 and 5xx responses,
timeouts, truncated bodies and connection errors are retried with exponential backoff
(``Retry-After`` honoured up to ``max_backoff_s``) before they count as failures.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from pathlib import Path

from mmsmall.config import ConfigError

from .download_shards import download_shards
from .fetch import (
    DownloadConfig,
    Fetched,
    Fetcher,
    add_expected,
    check_columns,
    expected_sha256,
    iter_row_batches,
    judge_row,
    read_log,
    save_file,
)


def download(rows_file: str | Path, out_dir: str | Path, cfg: DownloadConfig | None = None,
             retry_failed: bool = False, executor: str = "local", workers: int | None = None) -> dict:  # fmt: skip
    """Fetch the URLs of ``rows_file`` into ``out_dir`` (see the module docstring); the report dict."""
    cfg = cfg or DownloadConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.output not in ("webdataset", "files"):
        raise ConfigError(f"download output {cfg.output!r}; valid: webdataset, files")
    if executor not in ("local", "ray"):
        raise ConfigError(f"download executor {executor!r}; valid: local, ray")
    if cfg.output == "webdataset":
        return download_shards(Path(rows_file), out, cfg, retry_failed, executor, workers)
    if executor != "local" or (workers or 1) > 1:
        raise ConfigError(
            "--output files runs in one process (one fetch log); use --output webdataset (the default) "
            "for --executor ray or --workers, whose shards are the tasks"
        )
    log_path = out / "fetch_log.jsonl"
    done = read_log(log_path, out)
    # Read through once before fetching: per URL to fetch, the sha256s its rows expect (None: some row
    # takes any bytes), wherever in the file its rows are. So a URL is fetched once per run, its bytes
    # are refused only when no row expects them, and each row is judged by its own hash below
    # (judge_row). One entry per distinct URL, none per row: memory stays flat in the row count.
    wanted: dict[str, frozenset[str] | None] = {}
    for n, batch in enumerate(iter_row_batches(Path(rows_file))):
        if n == 0:
            check_columns(rows_file, batch[0], cfg)
        for row in batch:
            url = str(row.get(cfg.url_field) or "")
            prev = done.get(url)
            if url and (prev is None or (retry_failed and prev.reason != "ok")):
                add_expected(wanted, url, expected_sha256(row, cfg))
    with open(log_path, "a", encoding="utf-8") as log:

        def record(f: Fetched) -> None:
            if f.reason == "ok":
                f.file, f.data = save_file(out, f), b""
            log.write(f.line() + "\n")
            log.flush()
            done[f.url] = f
            bar.update(1)

        from tqdm.auto import tqdm

        bar = tqdm(total=len(wanted), desc="download", unit="img", dynamic_ncols=True)
        asyncio.run(Fetcher(cfg, record).run(iter(wanted.items())))
        bar.close()
    n_rows, reasons = 0, Counter()
    with open(out / "images.jsonl.tmp", "w", encoding="utf-8") as f:
        for batch in iter_row_batches(Path(rows_file)):
            for row in batch:
                n_rows += 1
                url = str(row.get(cfg.url_field) or "")
                res = judge_row(expected_sha256(row, cfg), done.get(url, Fetched(url, "fetch_no_url")))
                reasons[res.reason] += 1
                keep = {
                    k: v
                    for k, v in row.items()
                    if isinstance(v, (str, int, float, bool, list, dict, type(None)))
                }
                if res.reason == "ok":
                    keep["image"] = res.file
                else:
                    keep.update({"_error": res.reason, "_line": n_rows})
                f.write(json.dumps(keep) + "\n")
    os.replace(out / "images.jsonl.tmp", out / "images.jsonl")
    failed = {k: v for k, v in sorted(reasons.items()) if k != "ok"}
    report = {"n_in": n_rows, "n_ok": reasons["ok"], "failed": failed, "fetched_now": len(wanted),
              "rows": str(out / "images.jsonl")}  # fmt: skip
    (out / "download_report.json").write_text(json.dumps(report, indent=2))
    return report
