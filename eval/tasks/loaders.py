"""Reading benchmark data: Hugging Face parquet layouts, the official JSON files, our shards.

Hugging Face datasets store an image column as a struct ``{bytes, path}``; a local copy is a
folder of parquet files (``data/test-00000-of-00002.parquet``, ``DocVQA/validation-...``) or one
parquet file. A hub id is read with the ``datasets`` package, only when it is installed and
the hub is reachable (``HF_HUB_OFFLINE`` unset).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import EvalDataError, Record


def _looks_like_hub_id(path: str) -> bool:
    return not Path(path).exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def _parquet_files(root: Path, split: str | None, config: str | None) -> list[Path]:
    """The parquet files of ``split`` (and ``config`` sub-folder) under ``root``, sorted."""
    if root.is_file():
        return [root]
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise EvalDataError(
            f"{root}: no *.parquet files in this folder; expected a Hugging Face dataset copy"
        )
    if config:
        in_config = [f for f in files if config in f.relative_to(root).parts[:-1]]
        files = in_config or files
    if split:
        in_split = [
            f
            for f in files
            if f.name.startswith(f"{split}-") or f.name == f"{split}.parquet" or split in f.parts[:-1]
        ]
        files = in_split or files
    return files


def iter_parquet_rows(
    path: str | Path,
    columns: list[str],
    *,
    split: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    optional: tuple[str, ...] = (),
) -> Iterator[tuple[dict[str, Any], str, int]]:
    """Rows ``(row, source_file, row_index)`` with ``columns`` (missing ones are an error) and
    whichever of the ``optional`` columns the file has."""
    import pyarrow.parquet as pq

    count = 0
    for f in _parquet_files(Path(path), split, config):
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise EvalDataError(f"{f}: not a readable parquet file ({type(e).__name__}: {e})") from None
        names = set(pf.schema_arrow.names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise EvalDataError(
                f"{f}: missing column(s) {missing}; found {sorted(names)}. "
                f"Expected the lmms-eval layout with columns {columns} (see EVAL_FORMATS.md)"
            )
        index = 0
        wanted = columns + [c for c in optional if c in names]
        for batch in pf.iter_batches(batch_size=256, columns=wanted):
            for row in batch.to_pylist():
                yield row, str(f), index
                index += 1
                count += 1
                if limit is not None and count >= limit:
                    return


def iter_hub_rows(
    hub_id: str, columns: list[str], *, split: str | None, config: str | None = None, limit: int | None = None
) -> Iterator[tuple[dict[str, Any], str, int]]:
    """Rows of a hub dataset through ``datasets`` (online only); same contract as parquet rows."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise EvalDataError(
            f"{hub_id}: not a local path, and HF_HUB_OFFLINE is set; download the dataset and pass its "
            f"folder (e.g. --data task=/data/{hub_id.split('/')[-1]})"
        )
    try:
        import datasets
    except ImportError:
        raise EvalDataError(
            f"{hub_id}: reading from the hub needs the `datasets` package (pip install datasets), "
            "or pass a local folder of the dataset's parquet files"
        ) from None
    ds = datasets.load_dataset(hub_id, config, split=split)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise EvalDataError(f"{hub_id}: missing column(s) {missing}; found {ds.column_names}")
    n = len(ds) if limit is None else min(limit, len(ds))
    for i in range(n):
        yield {c: ds[i][c] for c in columns}, hub_id, i


def iter_rows(
    path: str, columns: list[str], *, split: str | None, config: str | None = None, limit=None, optional=()
):
    """Parquet rows from a local path, else from the hub id ``path``."""
    if Path(path).exists():
        return iter_parquet_rows(path, columns, split=split, config=config, limit=limit, optional=optional)
    if _looks_like_hub_id(path):
        return iter_hub_rows(path, columns, split=split, config=config, limit=limit)
    raise EvalDataError(f"{path}: no such file or folder (and not a hub id of the form owner/name)")


def image_fields(value: Any, source: str, row_id: str) -> dict[str, Any]:
    """Record image keyword arguments from an HF image cell: ``{bytes, path}``, bytes, a path or PIL."""
    from PIL import Image

    if isinstance(value, dict):
        if value.get("bytes"):
            return {"image_bytes": value["bytes"]}
        if value.get("path"):
            p = Path(value["path"])
            if not p.is_absolute() and not p.exists() and Path(source).exists():
                p = Path(source).parent / p
            return {"image_path": str(p)}
    elif isinstance(value, (bytes, bytearray)):
        return {"image_bytes": bytes(value)}
    elif isinstance(value, str) and value:
        return {"image_path": value}
    elif isinstance(value, Image.Image):
        return {"image": value}
    raise EvalDataError(f"sample {row_id!r} in {source}: missing image (the image cell is {value!r:.80})")


def answers_list(value: Any, row_id: str, source: str) -> list[str]:
    """Gold answers as a non-empty list of strings; a clear error otherwise."""
    if value is None:
        answers: list[str] = []
    elif isinstance(value, str):
        answers = [value]
    elif isinstance(value, (int, float)):
        answers = [str(value)]
    else:
        answers = [str(a) for a in value]
    if not answers:
        raise EvalDataError(
            f"sample {row_id!r} in {source}: empty answer list; a sample needs at least one gold answer "
            "(test splits without answers are scored by the benchmark's server, not here)"
        )
    return answers


def read_json(path: Path) -> Any:
    """Parse a JSON file; a clear error naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{path}: malformed JSON ({e})") from None


def read_shard_records(
    path: str, tasks: tuple[str, ...], name: str, limit: int | None = None
) -> list[Record]:
    """Held-out samples of our webdataset shards whose ``task`` is in ``tasks``.

    Each sample's first user turn is the question and the following assistant turn the answer;
    its ``points`` and ``image`` size go into ``meta`` for pointing. Corrupt members are skipped
    by ``iter_samples`` and counted in ``meta["skipped"]`` of the first record.
    """
    from mmsmall.data.shards import iter_samples

    counters: dict[str, int] = {}
    records: list[Record] = []
    seen_tasks: set[str] = set()
    for sample in iter_samples(path, counters=counters):
        meta = sample["json"]
        seen_tasks.add(str(meta.get("task")))
        if meta.get("task") not in tasks:
            continue
        sid = str(meta.get("id", sample["key"]))
        msgs = meta.get("messages") or []
        user = next((m["content"] for m in msgs if m.get("role") == "user"), None)
        reply = next((m["content"] for m in msgs if m.get("role") == "assistant"), None)
        if user is None or reply is None:
            raise EvalDataError(f"{name}: sample {sid!r} in {path} has no user/assistant turn in 'messages'")
        if sample["image"] is None:
            raise EvalDataError(f"{name}: sample {sid!r} in {path} has no image")
        records.append(
            Record(
                id=sid,
                question=user,
                answers=answers_list(reply, sid, path),
                image=sample["image"],
                meta={
                    "points": meta.get("points", []),
                    "size": list(sample["image"].size),
                    "task": meta["task"],
                },
                source=str(path),
            )
        )
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise EvalDataError(
            f"{name}: no samples with task in {list(tasks)} under {path} (tasks found: {sorted(seen_tasks)}); "
            "is this the right held-out shard folder?"
        )
    if counters:
        records[0].meta["skipped"] = dict(counters)
    return records
