"""Decontamination against evaluation sets: image pHash matches and question n-gram overlap.

:func:`load_benchmark` reads the layouts eval/ reads (../shared/EVAL_FORMATS.md):
- ``parquet``: a Hugging Face parquet file or folder with an ``image`` column (``{bytes, path}``
  struct or raw bytes) and a ``question`` (or ChartQA ``query``) column;
- ``chartqa``: ChartQA's ``test_*.json`` list of ``{"imgname", "query", "label"}`` with ``png/``
  beside the json (or one level up);
- ``docvqa``: DocVQA's RRC json ``{"data": [{"questionId", "question", "image", ...}]}`` with image
  paths relative to the json;
- ``webdataset``: a shard folder (or one .tar) in the DESIGN.md schema, e.g. held-out synthetic
  eval shards (questions are the user turns).
:class:`DecontamIndex` is built once in the driver, saved in the work folder, and loaded by every
worker; :meth:`DecontamIndex.check` gives the hits for one sample.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from mmsmall.config import ConfigError

from .config import DecontamConfig
from .dedup import NearDupIndex, hex64, phash

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _detect(path: Path) -> str:
    if path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
        return "webdataset"
    if path.is_dir() or path.suffix == ".parquet":
        return "parquet"
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "data" in data:
        return "docvqa"
    if isinstance(data, list):
        return "chartqa"
    raise ConfigError(
        f"decontam benchmark {path}: cannot tell its format; set format: parquet|chartqa|docvqa"
    )


def _read_image(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def load_benchmark(path: str | Path, format: str = "auto", name: str = "") -> list[dict]:
    """Items ``{"benchmark", "id", "question", "image_bytes" | None}`` of one benchmark file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"decontam benchmark not found: {path}")
    fmt = _detect(path) if format == "auto" else format
    name = name or path.stem
    items: list[dict] = []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        for f in files:
            table = pq.read_table(f)
            cols = set(table.column_names)
            qcol = "question" if "question" in cols else "query" if "query" in cols else None
            for n, row in enumerate(table.to_pylist()):
                img = row.get("image")
                if isinstance(img, dict):
                    img = img.get("bytes")
                rid = row.get("questionId") or row.get("question_id") or f"{f.stem}_{n}"
                items.append({"benchmark": name, "id": str(rid), "question": str(row.get(qcol) or "") if qcol else "",
                              "image_bytes": bytes(img) if img else None})  # fmt: skip
    elif fmt == "chartqa":
        rows = json.loads(path.read_text())
        for n, row in enumerate(rows):
            img = None
            for folder in (path.parent / "png", path.parent.parent / "png"):
                img = img or _read_image(folder / str(row.get("imgname", "")))
            items.append({"benchmark": name, "id": f"{row.get('imgname', n)}#{n}", "question": str(row.get("query", "")),
                          "image_bytes": img})  # fmt: skip
    elif fmt == "docvqa":
        data = json.loads(path.read_text())
        for row in data.get("data", []):
            img = _read_image(path.parent / str(row.get("image", ""))) if row.get("image") else None
            items.append({"benchmark": name, "id": str(row.get("questionId")), "question": str(row.get("question", "")),
                          "image_bytes": img})  # fmt: skip
    elif fmt == "webdataset":
        from .config import InputConfig
        from .ingest import _tar_records

        inp = InputConfig(kind="webdataset", path=str(path), name=name)
        for tar in sorted(path.glob("*.tar")) if path.is_dir() else [path]:
            for rec in _tar_records({"file": str(tar)}, inp):
                question = " ".join(m["content"] for m in rec["messages"] if m.get("role") == "user")
                items.append(
                    {
                        "benchmark": name,
                        "id": rec["id"],
                        "question": question,
                        "image_bytes": rec["image_bytes"],
                    }
                )
    else:
        raise ConfigError(
            f"decontam benchmark {path}: format {fmt!r}; valid: auto, chartqa, docvqa, parquet, webdataset"
        )
    return items


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

    @classmethod
    def build(cls, cfg: DecontamConfig) -> DecontamIndex:
        hashes, refs, grams = [], [], {}
        seen: set[int] = set()
        for b in cfg.benchmarks:
            for it in load_benchmark(b.path, b.format, b.name):
                ref = f"{it['benchmark']}:{it['id']}"
                if it["image_bytes"]:
                    try:
                        h = phash(Image.open(io.BytesIO(it["image_bytes"])))
                    except Exception:  # noqa: BLE001 - a broken benchmark image cannot contaminate
                        h = None
                    if h is not None and h not in seen:
                        seen.add(h)
                        hashes.append(h)
                        refs.append(ref)
                for g in question_grams(it["question"], cfg.ngram):
                    grams.setdefault(g, ref)
        return cls(np.array(hashes, dtype=np.uint64), refs, grams, cfg.ngram, cfg.image_max_distance)

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
