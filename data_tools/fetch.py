"""The fetching half of the download stage (:mod:`data_tools.download`): its config, one URL's
result, the concurrent ``Fetcher`` with its deadlines and retries, the fetch log, and the row
streaming and per-row sha256 checks that the loose-file and webdataset outputs
(:mod:`data_tools.download_shards`) share."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from mmsmall.config import ConfigError

EXTS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tif", "BMP": "bmp"}  # PIL format
# Content types that say nothing about the bytes: an undecodable body under them is "undecodable",
# under any other non-image type (text/html, application/json) it is "not an image".
UNTYPED = ("", "application/octet-stream", "binary/octet-stream")


@dataclass
class DownloadConfig:
    url_field: str = "url"  # column with the image URL (PixMo: image_url)
    sha256_field: str = "sha256"  # column with the expected sha256 of the image bytes (PixMo: image_sha256)
    concurrency: int = 64  # requests in flight in total
    per_host: int = 16  # requests in flight to one host
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # longest wait for the next bytes of a response
    deadline_s: float = 120.0  # longest one attempt may take, connect + whole body
    retries: int = 3  # extra attempts after a 429 / 5xx / timeout / connection error
    backoff_s: float = 0.5  # first backoff; doubles each attempt, with jitter
    max_backoff_s: float = 30.0
    max_bytes: int = 20 * 1024 * 1024  # size cap, from Content-Length and while streaming
    max_redirects: int = 5
    user_agent: str = "mmsmall-download/0.1 (+https://github.com/mmsmall)"
    output: str = (
        "webdataset"  # webdataset: shards/ (data_tools/download_shards.py) | files: images/ + images.jsonl
    )
    shard_rows: int = 10_000  # webdataset: rows per shard
    caption_field: str = "caption"  # webdataset: written as each sample's .txt when the row has it


@dataclass
class Fetched:
    url: str
    reason: str  # "ok" or a failure reason
    file: str = ""  # path relative to out_dir
    sha256: str = ""
    bytes: int = 0
    attempts: int = 0
    detail: str = ""
    content_type: str = ""  # as the server sent it; the decoded bytes decided
    ext: str = ""  # the file extension of the decoded format (jpg, png, ...)
    data: bytes = field(default=b"", repr=False)  # the image bytes, until stored; never logged

    def line(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if k != "data"}, sort_keys=True)


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def _check_image(data: bytes) -> str | None:
    """The PIL format name of ``data``, or None when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            return str(im.format or "")
    except Exception:
        return None


class Fetcher:
    """Concurrent fetching: ``concurrency`` workers, at most ``per_host`` on one host; each result
    (an ``ok`` one carrying its bytes in ``data``) goes to ``on_done``, which stores it."""

    def __init__(self, cfg: DownloadConfig, on_done: Callable[[Fetched], None]):
        self.cfg, self.on_done = cfg, on_done
        self.hosts: dict[str, asyncio.Semaphore] = {}

    def _host(self, url: str) -> asyncio.Semaphore:
        host = urlsplit(url).netloc
        return self.hosts.setdefault(host, asyncio.Semaphore(self.cfg.per_host))

    async def _once(
        self, session: aiohttp.ClientSession, url: str, sha256: frozenset[str] | None
    ) -> tuple[Fetched, bool]:
        """One attempt: (result, retryable)."""
        cap = self.cfg.max_bytes
        async with session.get(url, max_redirects=self.cfg.max_redirects) as r:
            if r.status == 429 or r.status >= 500:
                return Fetched(url, f"fetch_http_{r.status}", detail=r.headers.get("retry-after", "")), True
            if r.status != 200:
                return Fetched(url, f"fetch_http_{r.status}"), False
            ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
            if r.content_length is not None and r.content_length > cap:
                return Fetched(
                    url, "fetch_too_large", detail=f"content-length {r.content_length} > {cap}"
                ), False
            buf = bytearray()
            async for chunk in r.content.iter_chunked(1 << 16):
                buf += chunk
                if len(buf) > cap:
                    return Fetched(url, "fetch_too_large", detail=f"body passed {cap} bytes"), False
        data = bytes(buf)
        digest = hashlib.sha256(data).hexdigest()
        if sha256 and digest not in sha256:  # none of the rows naming this URL expects these bytes
            return Fetched(url, "fetch_sha256_mismatch", sha256=digest, bytes=len(data)), False
        fmt = _check_image(data)
        if fmt is None:
            typed = not ctype.startswith("image/") and ctype not in UNTYPED
            reason = "fetch_not_image" if typed else "fetch_undecodable"
            return Fetched(
                url, reason, bytes=len(data), detail=ctype or "no content-type", content_type=ctype
            ), False
        ext = EXTS.get(fmt, fmt.lower() or "img")
        return Fetched(
            url, "ok", sha256=digest, bytes=len(data), content_type=ctype, ext=ext, data=data
        ), False

    async def fetch(self, session: aiohttp.ClientSession, url: str, sha256: frozenset[str] | None) -> Fetched:
        if urlsplit(url).scheme not in ("http", "https"):
            result = Fetched(url, "fetch_bad_url", detail="not an http(s) URL")
        else:
            async with self._host(url):
                result = await self._attempts(session, url, sha256)
        self.on_done(result)
        return result

    async def _attempts(
        self, session: aiohttp.ClientSession, url: str, sha256: frozenset[str] | None
    ) -> Fetched:
        """The first attempt that succeeds or may not be retried, else the last one."""
        cfg = self.cfg
        for attempt in range(cfg.retries + 1):
            try:
                result, retry = await asyncio.wait_for(self._once(session, url, sha256), cfg.deadline_s)
            except aiohttp.TooManyRedirects:
                result, retry = Fetched(url, "fetch_too_many_redirects"), False
            except aiohttp.InvalidURL as e:
                result, retry = Fetched(url, "fetch_bad_url", detail=str(e)), False
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as e:
                result, retry = Fetched(url, "fetch_timeout", detail=type(e).__name__), True
            except aiohttp.ClientPayloadError as e:  # the body ended before its Content-Length
                result, retry = Fetched(url, "fetch_truncated", detail=str(e)), True
            except (aiohttp.ClientError, OSError) as e:
                result, retry = (
                    Fetched(url, "fetch_connect_error", detail=f"{type(e).__name__}: {e}"),
                    True,
                )
            result.attempts = attempt + 1
            if not retry or attempt == cfg.retries:
                break
            wait = cfg.backoff_s * 2**attempt * (1 + random.random() / 4)
            if result.detail.isdigit():  # Retry-After in seconds
                wait = max(wait, float(result.detail))
            await asyncio.sleep(min(wait, cfg.max_backoff_s))
        return result

    async def run(self, items: Iterator[tuple[str, frozenset[str] | None]]) -> None:
        """Fetch every ``(url, hashes)`` of ``items`` (``hashes``: the sha256s the URL's rows expect, one
        of which the bytes must have; None or empty: any bytes) with ``concurrency`` workers fed through a short
        queue: the items are drawn as slots free up, so URLs in flight and in memory stay bounded."""
        cfg = self.cfg
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
        )
        connector = aiohttp.TCPConnector(limit=cfg.concurrency, limit_per_host=cfg.per_host)
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * cfg.concurrency)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=connector, headers={"user-agent": cfg.user_agent}, auto_decompress=True
        ) as session:

            async def worker() -> None:
                while (item := await queue.get()) is not None:
                    await self.fetch(session, *item)

            workers = [asyncio.create_task(worker()) for _ in range(cfg.concurrency)]
            for item in items:
                await queue.put(item)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)


# ----------------------------------------------------------------------------- rows in, rows out


ROW_BATCH = 8192  # rows read at a time when no batch size is given


def iter_row_batches(path: Path, batch_rows: int | None = None) -> Iterator[list[dict]]:
    """Rows of a parquet file (or folder of them, e.g. a hub-layout copy), .jsonl or .csv, in
    batches of at most ``batch_rows`` (default ``ROW_BATCH``): never the whole file in memory."""
    batch_rows = batch_rows or ROW_BATCH
    if not path.exists():
        raise ConfigError(f"download input not found: {path}; give a parquet, jsonl or csv file of rows")
    if path.is_dir() or path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for f in sorted(path.rglob("*.parquet")) if path.is_dir() else [path]:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                yield batch.to_pylist()
        return
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix == ".csv":
            import csv

            rows: Iterator[dict] = (dict(r) for r in csv.DictReader(f))
        else:
            rows = (json.loads(line) for line in f if line.strip())
        while batch := list(itertools.islice(rows, batch_rows)):
            yield batch


def expected_sha256(row: dict, cfg: DownloadConfig) -> str | None:
    """The sha256 a row expects of its image bytes, lower case; None when it names none."""
    want = row.get(cfg.sha256_field)
    return str(want).strip().lower() if want else None


def add_expected(hashes: dict[str, frozenset[str] | None], url: str, want: str | None) -> None:
    """Add one row's expected sha256 to its URL's set; None once any row of the URL takes any bytes."""
    have = hashes.get(url, frozenset())
    hashes[url] = None if want is None or have is None else have | {want}


def judge_row(want: str | None, res: Fetched) -> Fetched:
    """A row's own verdict on its URL's fetch: an ``ok`` whose bytes are not the sha256 this row expects
    is ``fetch_sha256_mismatch`` for this row (another row of the URL may have expected them)."""
    if res.reason != "ok" or want is None or res.sha256 == want:
        return res
    return Fetched(res.url, "fetch_sha256_mismatch", sha256=res.sha256, bytes=res.bytes, attempts=res.attempts,
                   detail=f"expected {want}", content_type=res.content_type)  # fmt: skip


def read_log(log: Path, out_dir: Path) -> dict[str, Fetched]:
    """The last result per URL; an ``ok`` whose file has gone is forgotten (fetched again)."""
    done: dict[str, Fetched] = {}
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                f = Fetched(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a line cut short by a kill
            if f.reason != "ok" or (out_dir / f.file).exists():
                done[f.url] = f
            else:
                done.pop(f.url, None)
    return done


def save_file(out: Path, f: Fetched) -> str:
    """Write an ``ok`` result's bytes under ``out/images/`` (named by the URL's sha256); its path."""
    key = url_key(f.url)
    rel = f"images/{key[:2]}/{key}.{f.ext}"
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(f.data)
    os.replace(tmp, path)  # a killed run never leaves a half-written image under its final name
    return rel


def check_columns(rows_file, first: dict, cfg: DownloadConfig) -> None:
    if cfg.url_field not in first:
        raise ConfigError(
            f"{rows_file}: no URL column {cfg.url_field!r} (columns: {sorted(first)}); "
            "set --url-field (LAION-400M/5B: URL, DataComp and img2dataset: url, PixMo: image_url)"
        )
