"""Decontamination against evaluation sets: image pHash matches and question n-gram overlap.

:func:`load_benchmark` reads every layout ``mmsmall eval --data`` accepts, through eval's own
loaders (``eval/tasks/*.py`` cite each format's source):

- ``chartqa``: ChartQA's ``test_human.json`` / ``test_augmented.json`` with ``png/`` beside them
  (the repository folder, its ``test/`` folder, or one json);
- ``docvqa`` / ``infovqa``: the RRC json (``{"data": [{"questionId", "question", "image", ...}]}``;
  InfographicVQA names images ``image_local_name``), a file or the folder holding it;
- ``textvqa``: the official TextVQA json with ``train_images/`` (or ``test_images/``, ``images/``);
- ``ai2d`` / ``ocrbench``: the lmms-eval / hub parquet layouts, read by eval's loaders;
- ``multidocvqa`` / ``muirbench``: their hub parquet layouts (MP-DocVQA's ``image_1`` .. ``image_20``,
  MuirBench's ``image_list``): every image of a question is indexed;
- ``parquet``: any parquet file or folder with an ``image`` column (``{bytes, path}`` struct or raw
  bytes) and a ``question`` (or ChartQA ``query``) column;
- ``webdataset``: a shard folder (or one tar) in the DESIGN.md schema, e.g. held-out synthetic
  eval shards (questions are the user turns).

``format: auto`` takes shards when the path holds tars, parquet (then the several-image parquet
layouts) when it holds parquet files, and otherwise tries the json layouts in turn; a benchmark that yields no item is an error naming the
path and each layout tried. :class:`DecontamIndex` is built once in the driver, saved in the work
folder, and loaded by every worker; its ``counts`` say how many images and questions each
benchmark gave.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from mmsmall.config import ConfigError
from mmsmall.data.shards import TAR_SUFFIXES

from .config import BENCHMARK_FORMATS as FORMATS
from .config import DecontamConfig
from .dedup import NearDupIndex, hex64, phash

_WORD = re.compile(r"\w+", re.UNICODE)

JSON_LAYOUTS = ("chartqa", "docvqa", "infovqa", "textvqa")  # tried in this order by format: auto


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _is_tar(p: Path) -> bool:
    return p.name.endswith(TAR_SUFFIXES)


def _candidates(path: Path) -> tuple[str, ...]:
    """The layouts ``format: auto`` tries for ``path``, most specific first."""
    if _is_tar(path) or (path.is_dir() and any(_is_tar(p) for p in path.iterdir())):
        return ("webdataset",)
    if path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
        return ("parquet", "multidocvqa", "muirbench")
    from eval.tasks.chartqa import json_files

    # without ChartQA's json files its loader would read the folder as a hub dataset
    return tuple(f for f in JSON_LAYOUTS if f != "chartqa" or json_files(path))


def _parquet_items(path: Path, name: str) -> list[dict]:
    import pyarrow.parquet as pq

    items = []
    for f in sorted(path.rglob("*.parquet")) if path.is_dir() else [path]:
        table = pq.read_table(f)
        cols = set(table.column_names)
        if "image" not in cols:
            raise ConfigError(f"{f} has no 'image' column (columns: {sorted(cols)})")
        qcol = "question" if "question" in cols else "query" if "query" in cols else None
        for n, row in enumerate(table.to_pylist()):
            img = row.get("image")
            if isinstance(img, dict):
                img = img.get("bytes")
            rid = row.get("questionId") or row.get("question_id") or f"{f.stem}_{n}"
            question = str(row.get(qcol) or "") if qcol else ""
            items.append({"benchmark": name, "id": str(rid), "question": question,
                          "image_bytes": bytes(img) if isinstance(img, (bytes, bytearray)) else None})  # fmt: skip
    return items


def _shard_items(path: Path, name: str) -> list[dict]:
    from .config import InputConfig
    from .ingest import _tar_records

    inp = InputConfig(kind="webdataset", path=str(path), name=name)
    items = []
    for tar in sorted(p for p in path.iterdir() if _is_tar(p)) if path.is_dir() else [path]:
        for rec in _tar_records({"file": str(tar)}, inp):
            if rec["error"] == "unreadable_shard":
                raise ConfigError(f"shard {tar} is unreadable or truncated")
            question = " ".join(m["content"] for m in rec["messages"] if m.get("role") == "user")
            items.append(
                {"benchmark": name, "id": rec["id"], "question": question, "image_bytes": rec["image_bytes"]}
                | ({"images": rec["images"]} if rec["images"] else {})
            )
    return items


def _eval_items(path: Path, fmt: str, name: str) -> list[dict]:
    """Items of an eval layout, read by that eval task's loader; image files are read here."""
    from eval.tasks import get_task

    items = []
    for r in get_task(fmt).load(str(path), None):
        pages = [r] if r.images is None else [r.page(k) for k in range(len(r.images))]
        blobs = [_record_image(p) for p in pages]
        items.append(
            {
                "benchmark": name,
                "id": r.id,
                "question": r.question,
                "image_bytes": blobs[0][0],
                "file": blobs[0][1],
            }
            | ({"images": [d for d, _ in blobs], "files": [f for _, f in blobs if f]} if r.images else {})
        )
    return items


def _record_image(r) -> tuple[bytes | None, str | None]:
    """(bytes, file) of an eval record's one image, from its bytes, PIL image or file."""
    data, file = r.image_bytes, r.image_path
    if data is None and r.image is not None:
        buf = io.BytesIO()
        r.image.save(buf, format="PNG")
        data = buf.getvalue()
    if data is None and file and Path(file).is_file():
        data = Path(file).read_bytes()
    return data, file


def _read_layout(path: Path, fmt: str, name: str) -> list[dict]:
    if fmt == "webdataset":
        return _shard_items(path, name)
    if fmt == "parquet":
        return _parquet_items(path, name)
    return _eval_items(path, fmt, name)


def load_benchmark(path: str | Path, format: str = "auto", name: str = "") -> list[dict]:
    """Items ``{"benchmark", "id", "question", "image_bytes" | None, "file"?}`` of one benchmark.

    Raises ``ConfigError`` naming the path and every layout tried when none yields an item.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"decontam benchmark not found: {path}")
    if format not in FORMATS:
        raise ConfigError(f"decontam benchmark {path}: format {format!r}; valid: {', '.join(FORMATS)}")
    name = name or path.stem
    tried = []
    for fmt in _candidates(path) if format == "auto" else (format,):
        try:
            items = _read_layout(path, fmt, name)
        except Exception as e:  # noqa: BLE001 - a loader meeting another layout fails in its own way
            tried.append(f"{fmt} ({type(e).__name__}: {str(e)[:160]})")
            continue
        if items:
            return items
        tried.append(f"{fmt} (no items)")
    raise ConfigError(
        f"decontam benchmark {path}: no benchmark items found; layouts tried: {'; '.join(tried)}. "
        "Give a folder or file in a layout `mmsmall eval --data` accepts (ChartQA, DocVQA, InfoVQA, "
        "TextVQA json with their images; parquet with image and question columns; the MP-DocVQA / "
        "MuirBench hub parquet; webdataset shards) "
        "and set format: " + "|".join(FORMATS)
    )


class DecontamIndex:
    """Benchmark image hashes and question n-grams; picklable-free save/load as npz + json."""

    def __init__(
        self, hashes: np.ndarray, refs: list[str], ngrams: dict[str, str], ngram: int, max_distance: int
    ):
        self.hashes = np.asarray(hashes, dtype=np.uint64)
        self.refs = refs  # "benchmark:id" per hash
        self.ngrams = ngrams  # "w1 w2 ... wn" (or a whole short question) -> "benchmark:id"
        self.n = ngram
        self.max_distance = max_distance
        self._index = NearDupIndex(self.hashes, max_distance) if len(self.hashes) else None
        self.counts: dict[str, dict[str, int]] = {}  # benchmark -> {items, images, questions} (build only)

    @classmethod
    def build(cls, cfg: DecontamConfig) -> tuple[DecontamIndex, list[str]]:
        """The index of every benchmark, and the files it was built from (for the resume check)."""
        hashes, refs, grams = [], [], {}
        seen: set[int] = set()
        counts: dict[str, dict[str, int]] = {}
        reads: set[str] = set()
        for b in cfg.benchmarks:
            root = Path(b.path)
            reads.update(str(f) for f in ([root] if root.is_file() else root.rglob("*")) if f.is_file())
            items = load_benchmark(b.path, b.format, b.name)
            n = counts.setdefault(items[0]["benchmark"], {"items": 0, "images": 0, "questions": 0})
            for it in items:
                ref = f"{it['benchmark']}:{it['id']}"
                n["items"] += 1
                for f in [it.get("file"), *it.get("files", [])]:
                    if f:
                        reads.add(str(f))
                for data in it.get("images") or [it["image_bytes"]]:  # every page of a several-image item
                    if not data:
                        continue
                    try:
                        h = phash(Image.open(io.BytesIO(data)))
                    except Exception:  # noqa: BLE001 - a broken benchmark image cannot contaminate
                        h = None
                    n["images"] += h is not None
                    if h is not None and h not in seen:
                        seen.add(h)
                        hashes.append(h)
                        refs.append(ref)
                q = question_grams(it["question"], cfg.ngram)
                n["questions"] += bool(q)
                for g in q:
                    grams.setdefault(g, ref)
        index = cls(np.array(hashes, dtype=np.uint64), refs, grams, cfg.ngram, cfg.image_max_distance)
        index.counts = counts
        return index, sorted(reads)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        np.save(path.with_suffix(".npy"), self.hashes)
        meta = {"refs": self.refs, "ngrams": self.ngrams, "ngram": self.n, "max_distance": self.max_distance}
        path.with_suffix(".json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path) -> DecontamIndex:
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(
            np.load(path.with_suffix(".npy")),
            meta["refs"],
            meta["ngrams"],
            meta["ngram"],
            meta["max_distance"],
        )

    def check_images(self, hashes: np.ndarray) -> dict[int, tuple[str, int]]:
        """Row -> (benchmark ref, distance) for the rows of ``hashes`` that match an eval image."""
        if self._index is None or len(hashes) == 0:
            return {}
        q, i, d = self._index.query(np.asarray(hashes, dtype=np.uint64))
        hits: dict[int, tuple[str, int]] = {}
        for qi, ii, di in zip(q.tolist(), i.tolist(), d.tolist()):
            if qi not in hits or di < hits[qi][1]:
                hits[qi] = (self.refs[ii], di)
        return hits

    def check_text(self, messages: list[dict]) -> tuple[str, str] | None:
        """(benchmark ref, matched n-gram) when a user turn overlaps an eval question."""
        for m in messages:
            if m.get("role") != "user":
                continue
            for g in question_grams(m.get("content", ""), self.n):
                if g in self.ngrams:
                    return self.ngrams[g], g
        return None


def question_grams(text: str, n: int) -> list[str]:
    """Word n-grams of a question; a question shorter than n words is one gram (matched whole)."""
    w = words(text)
    if not w:
        return []
    if len(w) < n:
        return [" ".join(w)]
    return [" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]


def hit_record(sample_id: str, source: str, kind: str, ref: str, detail: str) -> dict:
    return {"id": sample_id, "source": source, "kind": kind, "benchmark": ref, "detail": detail}


__all__ = ["DecontamIndex", "load_benchmark", "question_grams", "hex64", "hit_record"]
