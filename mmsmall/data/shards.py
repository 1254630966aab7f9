"""Reading webdataset shards: plain iteration, and a resumable mixture stream for training.

Two ways in:

- ``iter_samples(path)`` yields every good sample of a shard set once, in order. Corrupt members
  (an image PIL cannot decode, json that does not parse, a sample missing its json, an unreadable
  tar) are skipped, counted in ``counters`` by reason and logged with the shard and key.
- ``SampleStream(entries, seed, rank, world_size)`` is the endless training stream: a mixture of
  shard sets drawn by rate, each shard set visited in a seeded per-epoch shard order, each shard's
  samples in a seeded permutation, shards split across ranks. Its position is explicit
  (``state_dict`` / ``load_state_dict``), so a resumed run continues at exactly the next sample.
  Every sample it yields carries a ``ref`` from which ``sample_at(ref)`` re-reads it, which lets
  the packer save the examples it still holds as small references instead of tensors.

A shard is read into memory whole (raw bytes, tens of MB at most) and images are decoded on
demand, so the seeded within-shard permutation costs no extra I/O. A stream made with
``decode_images=False`` (training) yields the image's raw bytes instead (``image_bytes``): the data
workers decode them (``decode_image``), so the expensive part runs in parallel.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from PIL import Image

from mmsmall.data.keys import member_key
from mmsmall.data.remote import expand_braces, fetch_shard, is_remote, resolve_remote
from mmsmall.errors import MissingInput
from mmsmall.processing.images import to_rgb_image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what a folder scan takes as shards (tarfile reads them all)


class TruncatedTarError(tarfile.ReadError):
    """A tar that ends without its end-of-archive block: cut short, not a shorter whole shard."""


def list_tars(folder: Path) -> list[Path]:
    """The shard files of a folder without a manifest, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))


def tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Every member of an open tar, then a check that the archive ended with its zero block.

    ``tarfile`` stops quietly at a header that is cut short (or at a file ending on a block
    boundary), so a truncated shard would read as a shorter complete one; here it raises
    :class:`TruncatedTarError` after the last whole member instead.
    """
    yield from tar
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise TruncatedTarError(f"truncated: no end-of-archive block at byte {tar.offset}")


class Sample(TypedDict, total=False):
    key: str
    image: Image.Image | list[Image.Image] | None  # a list: the pages of a several-image sample
    image_bytes: bytes | list[bytes] | None  # undecoded image(s) (a stream with decode_images=False)
    shard: str  # the tar it came from (for skip messages)
    json: dict
    ref: tuple[int, int, int, int]  # (entry, epoch, shard position, sample position); stream only
    empty: bool  # a stream's marker: a whole epoch of an entry gave no readable sample (see _next_from)


# ----------------------------------------------------------------------------- shard lists


def resolve_shards(shard_dir_or_tars: str | Path | Sequence[str | Path]) -> list[Path]:
    """The tar files of a shard set, in order.

    Accepts a folder with ``manifest.json`` (its shard order), a folder without one (sorted
    ``*.tar``), a brace pattern (``/data/charts-{000000..000009}.tar``), one tar, or a list of
    any of these.
    """
    if isinstance(shard_dir_or_tars, (list, tuple)):
        return [p for item in shard_dir_or_tars for p in resolve_shards(item)]
    if is_remote(shard_dir_or_tars):  # http(s):// URLs and pipe: commands stay strings
        return resolve_remote(shard_dir_or_tars)  # type: ignore[return-value]
    path = Path(shard_dir_or_tars)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.exists():
            shards = json.loads(manifest.read_text()).get("shards", [])
            return [path / s["name"] for s in shards]
        tars = list_tars(path)
        if not tars:
            raise MissingInput(
                f"{path}: no manifest.json and no {', '.join(TAR_SUFFIXES)} files; is this a shard folder?"
            )
        return tars
    text = str(shard_dir_or_tars)
    if "{" in text:
        paths = [Path(p) for p in expand_braces(text)]
    else:
        paths = [path]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise MissingInput(
            f"shard {missing[0]} not found ({len(missing)} of {len(paths)} missing) "
            f"while resolving {text!r}; give a shard folder, a tar, or a brace pattern of tars"
        )
    return paths


# ----------------------------------------------------------------------------- decoding


def _count(counters: dict[str, int] | None, reason: str) -> None:
    if counters is not None:
        counters[reason] = counters.get(reason, 0) + 1


class SkipCounts(dict):
    """Skipped members by reason, and (``logged``) those already warned about: a stream re-reading
    a shard every epoch warns about each bad member once. A plain dict counts and warns every time."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.logged: set[tuple[str, str, str]] = set()


def log_skip(counters: dict | None, reason: str, shard: Path | str, key: str, detail: str = "") -> None:
    """Warn about a skipped member (once per member where ``counters`` is a ``SkipCounts``)."""
    logged = getattr(counters, "logged", None)
    marker = (str(shard), key, reason)
    if logged is None or marker not in logged:
        if logged is not None:
            logged.add(marker)
        log.warning("skipping sample %s in %s: %s%s", key, shard, reason, f" ({detail})" if detail else "")


def _skip(
    counters: dict[str, int] | None, reason: str, shard: Path | str, key: str, detail: str = ""
) -> None:
    _count(counters, reason)
    log_skip(counters, reason, shard, key, detail)


def _open_tar(shard: Path | str) -> tarfile.TarFile:
    """A local tar, or a remote one (URL / ``pipe:``) fetched whole with retries (``remote.py``)."""
    if is_remote(shard):
        return tarfile.open(fileobj=io.BytesIO(fetch_shard(str(shard))), mode="r")
    return tarfile.open(shard, "r")


def read_shard_members(
    shard: Path, counters: dict[str, int] | None = None
) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of one tar as ``(key, {ext: bytes})`` in tar order.

    An unreadable or truncated tar is counted once (``unreadable_tar``); the samples read before
    the fault are kept except the last one, which the fault may have cut short.
    """
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with _open_tar(shard) as tar:
            for member in tar_members(tar):
                if not member.isfile():
                    continue
                split = member_key(member.name)
                if split is None:
                    continue
                key, ext = split
                parts = groups.setdefault(key, {})
                if ext in parts:  # the same member twice: keep the first, count the other
                    _skip(counters, "duplicate_member", shard, key, f"{member.name} repeated")
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    parts[ext] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        _skip(counters, "unreadable_tar", shard, "*", str(e))
        return list(groups.items())[:-1]
    return list(groups.items())


def open_image(data: bytes | list[bytes]) -> Image.Image | list[Image.Image]:
    """Image bytes -> a fully decoded RGB image (a list of bytes, a sample's pages -> the list of
    images, in order); raises what PIL raises for bad bytes, naming the page of a list."""
    if isinstance(data, list):
        pages = []
        for k, page in enumerate(data):
            try:
                pages.append(open_image(page))
            except Exception as e:  # PIL raises many types for bad bytes
                raise ValueError(f"image {k + 1} of {len(data)}: {type(e).__name__}: {e}") from None
        return pages
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # force a full decode: truncated files fail here, not later
        return to_rgb_image(im)


_PAGE = re.compile(r"(\d+)\.(?:" + "|".join(IMAGE_EXTS) + ")")


def image_members(parts: dict[str, bytes], meta: dict) -> bytes | list[bytes] | None | str:
    """A sample's image bytes: ``{key}.jpg`` (one image), or ``{key}.0.jpg``, ``{key}.1.png``, ...
    (several, in page order: docs/INTERFACES.md's shard schema), or None (text only). A string is
    what is wrong with the numbered members (gaps, a count unlike the json's ``images`` list)."""
    pages = sorted((int(m[1]), data) for ext, data in parts.items() if (m := _PAGE.fullmatch(ext)))
    if not pages:
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        return parts[ext] if ext else None
    numbers = [n for n, _ in pages]
    listed = meta.get("images")
    if numbers != list(range(len(pages))) or (isinstance(listed, list) and len(listed) != len(pages)):
        return f"images numbered {numbers[:8]} but its json lists {len(listed or [])}"
    return [data for _, data in pages]


def decode_sample(
    shard: Path,
    key: str,
    parts: dict[str, bytes],
    counters: dict[str, int] | None = None,
    *,
    decode_images: bool = True,
) -> Sample | None:
    """One raw tar group -> ``Sample``; None (counted and logged) when it is corrupt. Without
    ``decode_images`` the image stays bytes (``image_bytes``) for ``decode_image`` to open later."""
    if "json" not in parts:
        _skip(counters, "missing_json", shard, key)
        return None
    try:
        meta = json.loads(parts["json"].decode("utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    except (ValueError, UnicodeDecodeError) as e:
        _skip(counters, "bad_json", shard, key, str(e))
        return None
    images = image_members(parts, meta)
    if isinstance(images, str):
        _skip(counters, "bad_image", shard, key, images)
        return None
    sample: Sample = {"key": key, "json": meta, "shard": str(shard), "image_bytes": images}
    return decode_image(sample, counters) if decode_images else sample


def decode_image(sample: Sample, counters: dict[str, int] | None = None) -> Sample | None:
    """Open a sample's ``image_bytes`` into ``image``; None (counted ``bad_image``, logged) when they
    do not decode."""
    data = sample.pop("image_bytes", None)
    image = None
    if data is not None:
        try:
            image = open_image(data)
        except Exception as e:  # PIL raises many types for bad bytes
            _skip(counters, "bad_image", sample.get("shard", "?"), sample["key"], f"{type(e).__name__}: {e}")
            return None
    sample["image"] = image
    return sample


def iter_samples(
    shard_dir_or_tars: str | Path | Sequence[str | Path], *, counters: dict[str, int] | None = None
) -> Iterator[Sample]:
    """Every good sample of a shard set once, in shard and tar order; corrupt ones skipped and counted."""
    for shard in resolve_shards(shard_dir_or_tars):
        for key, parts in read_shard_members(shard, counters):
            sample = decode_sample(shard, key, parts, counters)
            if sample is not None:
                yield sample


def sample_id(sample: Sample) -> str:
    """The id a training log reports for a sample: its json ``id``, else its key."""
    return str(sample["json"].get("id", sample["key"]))


# ----------------------------------------------------------------------------- training stream


@dataclass
class _Cursor:
    epoch: int = 0
    shard_pos: int = 0  # index into this rank's shard order of the epoch
    sample_pos: int = 0  # index into the shard's sample permutation


@dataclass
class _Entry:
    name: str
    shards: list[Path]
    rate: float
    cursor: _Cursor = field(default_factory=_Cursor)


class SampleStream:
    """Endless, deterministic, resumable mixture of shard sets, partitioned across ranks.

    - Mixture: before each sample, an entry is drawn with probability ``rate / sum(rates)`` by a
      numpy generator seeded with ``(seed, rank)``; its bit-generator state is part of the position.
    - Epoch order: entry ``i`` in epoch ``e`` visits its shards in a permutation seeded by
      ``(seed, i, e)``; rank ``r`` of ``W`` takes every ``W``-th shard of it starting at ``r`` when
      there are at least ``W`` shards, otherwise every rank reads all shards and keeps every
      ``W``-th sample. Within a shard, samples come in a permutation seeded by ``(seed, i, e, shard)``.
    - Position: ``state_dict()`` holds the per-entry (epoch, shard, sample) cursors and the
      mixture generator state; ``load_state_dict`` restores them, so the next sample after a
      resume is exactly the one that would have come next. A resume on another world size
      (``mmsmall/data/elastic.py``) instead restarts each entry's current epoch with the samples
      the earlier ranks trained marked ``done``, which the stream passes over.
    - Unreadable data: when two epochs of an entry pass without a readable sample, the stream
      yields a marker ``{"empty": True, "ref": (entry, epoch, -1, -1)}`` instead of looping on;
      the reader (``TrainData``) decides, in one place, when the data holds nothing usable.
    - ``decode_images=False`` yields images as bytes (``image_bytes``), for data workers to decode.
    """

    def __init__(
        self,
        entries: Iterable[Any],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        counters: dict[str, int] | None = None,
        decode_images: bool = True,
    ):
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.counters = counters if counters is not None else SkipCounts()
        self.decode_images = decode_images
        self._warned_empty: set[int] = set()  # entries already reported as reading nothing
        self.entries: list[_Entry] = []
        for i, e in enumerate(entries):
            path, rate, name = (
                (e.path, e.rate, e.name)
                if hasattr(e, "path")
                else (e["path"], e.get("rate", 1.0), e.get("name", ""))
            )
            if rate <= 0:
                raise ValueError(f"data.train[{i}] ({path}): rate must be > 0, got {rate}")
            shards = resolve_shards(path)
            if not shards:
                raise ValueError(f"data.train[{i}] ({path}): no shards found")
            self.entries.append(_Entry(name or Path(str(path)).name, shards, float(rate)))
        if not self.entries:
            raise ValueError(
                "data.train is empty: give at least one shard set, e.g. data.train=[{path: shards/}]"
            )
        rates = np.array([e.rate for e in self.entries], dtype=np.float64)
        self.probs = rates / rates.sum()
        self.rng = np.random.default_rng([self.seed, self.rank, 7919])
        # the shard each entry is reading: entry -> ((epoch, shard), path, members, permutation); one per
        # entry, so a mixture that switches entries every sample does not re-read a tar each time
        self._cache: dict[
            int, tuple[tuple[int, int], Path, list[tuple[str, dict[str, bytes]]], np.ndarray]
        ] = {}
        self._empty_epochs = 0
        # samples trained before a resume on another world size (elastic.py): "entry/epoch/shard" ->
        # their positions in the shard's permutation, or "all"; this rank's stream passes over them
        self.done: dict[str, Any] = {}

    def _is_done(self, i: int, epoch: int, shard_idx: int, pos: int) -> bool:
        marked = self.done.get(f"{i}/{epoch}/{shard_idx}")
        return marked is not None and (marked == "all" or pos in marked)

    # --- orders -------------------------------------------------------------------------

    def _epoch_shards(
        self, i: int, epoch: int, rank: int | None = None, world: int | None = None
    ) -> tuple[list[int], bool]:
        """A rank's shard indices for entry ``i`` in ``epoch`` (default: this rank's), and whether
        samples are strided."""
        rank, world = (self.rank, self.world_size) if rank is None else (rank, world)
        n = len(self.entries[i].shards)
        order = np.random.default_rng([self.seed, i, epoch, 1]).permutation(n).tolist()
        if n >= world:
            return order[rank::world], False
        return order, True

    def _shard_samples(self, i: int, epoch: int, shard_idx: int):
        key = (epoch, shard_idx)
        if i not in self._cache or self._cache[i][0] != key:
            shard = self.entries[i].shards[shard_idx]
            members = read_shard_members(shard, self.counters)
            perm = np.random.default_rng([self.seed, i, epoch, shard_idx, 2]).permutation(len(members))
            self._cache[i] = (key, shard, members, perm)
        return self._cache[i][1:]

    # --- reading ------------------------------------------------------------------------

    def sample_at(self, ref: Sequence[int]) -> Sample | None:
        """Re-read the sample at ``ref = (entry, epoch, shard position, sample position)``."""
        i, epoch, shard_pos, sample_pos = (int(x) for x in ref)
        shard_ids, _ = self._epoch_shards(i, epoch)
        shard, members, perm = self._shard_samples(i, epoch, shard_ids[shard_pos])
        key, parts = members[int(perm[sample_pos])]
        sample = decode_sample(shard, key, parts, None, decode_images=self.decode_images)
        if sample is not None:
            sample["ref"] = (i, epoch, shard_pos, sample_pos)
        return sample

    def _next_from(self, i: int) -> Sample:
        entry = self.entries[i]
        cur = entry.cursor
        scanned = 0
        while True:
            shard_ids, strided = self._epoch_shards(i, cur.epoch)
            if cur.shard_pos >= len(shard_ids):
                cur.epoch, cur.shard_pos, cur.sample_pos = cur.epoch + 1, 0, 0
                scanned += 1
                if scanned >= 2:  # a whole epoch without a readable sample: say so, let the reader judge
                    if i not in self._warned_empty:
                        self._warned_empty.add(i)
                        log.warning(
                            "data.train entry %r: no readable sample for rank %d in a whole epoch of its "
                            "%d shards (skipped so far: %s)", entry.name, self.rank, len(entry.shards), self.counters
                        )  # fmt: skip
                    return {"key": "", "json": {}, "empty": True, "ref": (i, cur.epoch, -1, -1)}
                continue
            shard, members, perm = self._shard_samples(i, cur.epoch, shard_ids[cur.shard_pos])
            if cur.sample_pos >= len(members):
                cur.shard_pos, cur.sample_pos = cur.shard_pos + 1, 0
                continue
            pos = cur.sample_pos
            cur.sample_pos += 1
            if strided and pos % self.world_size != self.rank:
                continue
            if self.done and self._is_done(i, cur.epoch, shard_ids[cur.shard_pos], pos):
                scanned = 0  # trained before an elastic resume: progress, not an unreadable epoch
                continue
            key, parts = members[int(perm[pos])]
            sample = decode_sample(shard, key, parts, self.counters, decode_images=self.decode_images)
            if sample is None:
                continue
            scanned = 0
            sample["ref"] = (i, cur.epoch, cur.shard_pos, pos)
            return sample

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        i = int(self.rng.choice(len(self.entries), p=self.probs)) if len(self.entries) > 1 else 0
        return self._next_from(i)

    # --- position -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "entries": [
                {
                    "name": e.name,
                    "epoch": e.cursor.epoch,
                    "shard_pos": e.cursor.shard_pos,
                    "sample_pos": e.cursor.sample_pos,
                }
                for e in self.entries
            ],
            "rng": self.rng.bit_generator.state,
            "counters": dict(self.counters),
            "done": self._live_done(),
        }

    def _live_done(self) -> dict[str, Any]:
        """``done`` without the epochs this rank has left (another rank keeps those it still needs)."""
        epochs = [e.cursor.epoch for e in self.entries]
        out = {}
        for key, marked in self.done.items():
            i, epoch, _ = (int(x) for x in key.split("/"))
            if epoch >= epochs[i]:
                out[key] = marked if marked == "all" else sorted(marked)
        return out

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["world_size"]) != (self.seed, self.world_size) or len(
            state["entries"]
        ) != len(self.entries):
            raise ValueError(
                f"data position from a different run set-up: saved seed={state['seed']}, "
                f"world_size={state['world_size']}, {len(state['entries'])} mixture entries; now seed={self.seed}, "
                f"world_size={self.world_size}, {len(self.entries)} entries. Resume with the same seed, "
                "world size and data.train, or start a fresh out_dir."
            )
        for e, s in zip(self.entries, state["entries"]):
            e.cursor = _Cursor(int(s["epoch"]), int(s["shard_pos"]), int(s["sample_pos"]))
        self.rng.bit_generator.state = state["rng"]
        self.counters.clear()
        self.counters.update(state.get("counters", {}))
        self.done = {k: v if v == "all" else set(v) for k, v in state.get("done", {}).items()}
