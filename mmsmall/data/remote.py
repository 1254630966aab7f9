"""Shards that are not local files: ``http(s)://`` URLs and ``pipe:`` commands.

A shard set may be given as

- ``https://host/data/charts-{000000..000009}.tar`` (a brace pattern of URLs, or one URL);
- ``https://host/data/charts/`` (a folder URL ending in ``/``: its ``manifest.json`` lists the shards);
- ``pipe:aws s3 cp s3://bucket/charts-000000.tar -`` (a command writing one tar to stdout; brace
  patterns expand here too: ``pipe:curl -s https://host/charts-{000000..000003}.tar``).

A shard is fetched whole into memory (shards are read whole anyway, see ``shards.py``). A fetch
that fails (connection error, an HTTP error status, a body shorter than its Content-Length, a
command exiting non-zero) is retried ``RETRIES`` times with backoff; then :class:`ShardFetchError`
is raised and the reader skips the shard and counts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

RETRIES = int(os.environ.get("MMSMALL_SHARD_RETRIES", "2"))
TIMEOUT_S = float(os.environ.get("MMSMALL_SHARD_TIMEOUT_S", "60"))


class ShardFetchError(OSError):
    """A remote shard could not be read after its retries."""


def expand_braces(pattern: str) -> list[str]:
    """``/data/charts-{000000..000009}.tar`` -> the ten names (local paths and URLs alike)."""
    import braceexpand  # a webdataset dependency

    return list(braceexpand.braceexpand(pattern))


def is_remote(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(("http://", "https://", "pipe:"))


def _http_get(url: str) -> bytes:
    import requests

    with requests.get(url, timeout=(10, TIMEOUT_S), stream=True) as r:
        r.raise_for_status()
        data = b"".join(r.iter_content(1 << 20))  # a cut connection raises ChunkedEncodingError
        want = r.headers.get("content-length")
        if want is not None and want.isdigit() and len(data) != int(want):
            raise ShardFetchError(f"{url}: got {len(data)} of {want} bytes (connection cut mid-read)")
        return data


def _fetch_once(spec: str) -> bytes:
    if spec.startswith("pipe:"):
        proc = subprocess.run(spec[5:], shell=True, capture_output=True, timeout=TIMEOUT_S * 10)
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()[-300:]
            raise ShardFetchError(f"{spec}: exit {proc.returncode}: {err}")
        return proc.stdout
    return _http_get(spec)


def fetch_shard(spec: str, retries: int = RETRIES) -> bytes:
    """The bytes of one remote shard; retried with backoff, then :class:`ShardFetchError`."""
    import requests

    last = ""
    for attempt in range(retries + 1):
        try:
            return _fetch_once(spec)
        except (OSError, requests.RequestException, subprocess.TimeoutExpired) as e:
            last = f"{type(e).__name__}: {e}"
        if attempt < retries:
            time.sleep(min(0.2 * 2**attempt, 5.0))
    raise ShardFetchError(f"{spec}: failed after {retries + 1} attempts ({last})")


def resolve_remote(spec: str) -> list[str]:
    """The shard URLs / commands of a remote spec, in order (see the module docstring)."""

    if spec.startswith(("http://", "https://")) and spec.endswith("/"):
        manifest = json.loads(fetch_shard(spec + "manifest.json"))
        return [spec + s["name"] for s in manifest.get("shards", [])]
    return expand_braces(spec) if "{" in spec else [spec]
