"""Webdataset shard writing with a manifest (the DESIGN.md shard schema).

Shards are ``{prefix}-000000.tar`` holding ``{key}.jpg|png`` and ``{key}.json`` per sample; a
sample of several images (the pages of a document) holds them in order as ``{key}.0.jpg``,
``{key}.1.png``, ... (webdataset's key ends at the first dot, so they stay one sample) and its json
lists them under ``images`` (docs/INTERFACES.md, "Shard sample schema"). ``manifest.json`` beside
them lists per-shard sample counts, bytes and sha256. Tar members are written with fixed metadata
(mtime 0, uid/gid 0) so the same samples give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

from mmsmall.errors import MissingInput

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


MAX_KEY = 80  # a ustar member name holds 100 bytes: key, a "_N" de-dup suffix and ".json" must fit


def safe_key(text: str) -> str:
    """A webdataset key from any id: no dots, no slashes, only [A-Za-z0-9_-], at most ``MAX_KEY`` long.

    A longer id keeps its first characters and ends in a hash of the whole id, so distinct ids stay distinct.
    """
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", text)
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 17] + "_" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]
    return key or "_"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write samples into numbered tar shards and a ``manifest.json``.

    >>> with ShardWriter(out_dir, prefix="charts", max_count=1000) as w:
    ...     w.write("chart_000001", png_bytes, "png", {"id": "chart_000001", ...})

    Each shard is written to a temporary name and renamed when complete, so a killed run
    never leaves a half-written shard under the final name.
    """

    def __init__(
        self, out_dir: str | Path, prefix: str = "data", max_count: int = 1000, start_index: int = 0
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_count = max_count
        self.index = start_index
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._keys: set[str] = set()

    def _shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        self._tmp = self.out_dir / (self._shard_name(self.index) + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.out_dir / self._shard_name(self.index)
        os.replace(self._tmp, final)
        self.shards.append(
            {
                "name": final.name,
                "count": self._count,
                "bytes": final.stat().st_size,
                "sha256": file_sha256(final),
            }
        )
        self._tar = None
        self.index += 1

    def write(self, key: str, image: bytes | list[bytes], ext: str | list[str], meta: dict) -> None:
        """Add one sample: its image bytes with extension ``ext`` and its json record.

        Several images (lists ``image`` and ``ext`` of one length) become ``{key}.0.{ext}``,
        ``{key}.1.{ext}``, ... in list order, and ``meta["images"]`` must list as many; a list of
        one image is written as a one-image sample, ``{key}.{ext}``.
        """
        if not _KEY_RE.match(key):
            raise ValueError(f"shard key {key!r}: keys may hold only letters, digits, '_' and '-' (no dots)")
        if key in self._keys:
            raise ValueError(f"shard key {key!r} written twice; keys must be unique within a dataset")
        images = image if isinstance(image, list) else [image]
        exts = [e.lower().lstrip(".") for e in (ext if isinstance(ext, list) else [ext])]
        if not images or len(images) != len(exts):
            raise ValueError(f"sample {key}: {len(images)} image(s) with {len(exts)} extension(s)")
        for e in exts:
            if e not in IMAGE_EXTS:
                raise ValueError(f"sample {key}: image extension {e!r} not one of {', '.join(IMAGE_EXTS)}")
        listed = meta.get("images")
        if len(images) > 1 and not (isinstance(listed, list) and len(listed) == len(images)):
            raise ValueError(f"sample {key}: {len(images)} images need a json 'images' list of {len(images)}")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._keys.add(key)
        if len(images) == 1:
            _add_member(self._tar, f"{key}.{exts[0]}", images[0])
        for i, (data, e) in enumerate(zip(images, exts) if len(images) > 1 else ()):
            _add_member(self._tar, f"{key}.{i}.{e}", data)
        _add_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
        self._count += 1
        if self._count >= self.max_count:
            self._finish()

    def close(self, extra: dict | None = None, manifest: bool = True) -> dict:
        """Finish the open shard and write ``manifest.json``; returns the manifest.

        With ``manifest=False`` only the shard is finished (the caller writes one manifest for
        shards written by several writers, e.g. one writer per output shard in curation).
        """
        self._finish()
        if not manifest:
            return {"shards": self.shards, "total": sum(s["count"] for s in self.shards)}
        return write_manifest(self.out_dir, self.shards, extra)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


def write_manifest(out_dir: str | Path, shards: list[dict], extra: dict | None = None) -> dict:
    """Write ``manifest.json`` (atomically) for the given per-shard entries; returns it."""
    manifest = {
        "format": "mmsmall-webdataset-v1",
        "shards": shards,
        "total": sum(s["count"] for s in shards),
        **(extra or {}),
    }
    out_dir = Path(out_dir)
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, out_dir / "manifest.json")
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.exists():
        raise MissingInput(f"{path}: no manifest.json; is {shard_dir} a folder written by data_tools?")
    return json.loads(path.read_text())
