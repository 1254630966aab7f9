"""Reading benchmark data: Hugging Face parquet layouts, the official JSON files, our shards.

Hugging Face layouts (a hub id, or a local folder laid out like the hub repo:
``data/test-00000-of-00002.parquet``, ``DocVQA/validation-...``, a ``save_to_disk`` folder, one
parquet file) are all read by ``datasets`` through :mod:`mmsmall.data.hfdata`, the loader curation
shares; image cells stay ``{bytes, path}`` until a DataLoader worker decodes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import EvalDataError, Record, image_fields  # noqa: F401  (image_fields: read from here too)


def iter_rows(
    path: str,
    columns: list[str],
    *,
    split: str | None,
    config: str | None = None,
    limit: int | None = None,
    optional: tuple[str, ...] = (),
    streaming: bool = False,
) -> Iterator[tuple[dict[str, Any], str, int]]:
    """Rows ``(row, source, index)`` of a hub id or local copy, through the one loader curation
    uses too (:func:`mmsmall.data.hfdata.iter_hf_rows`); images stay undecoded."""
    from mmsmall.data.hfdata import HFDataError, iter_hf_rows

    rows = iter_hf_rows(
        path, columns, split=split, config=config, limit=limit, optional=optional, streaming=streaming
    )
    try:
        for row, index in rows:
            yield row, str(path), index
    except HFDataError as e:
        raise EvalDataError(str(e)) from None


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
        image = sample["image"]
        pages = image if isinstance(image, list) else None  # a several-image sample: its pages
        records.append(
            Record(
                id=sid,
                question=user,
                answers=answers_list(reply, sid, path),
                image=None if pages else image,
                images=pages,
                meta={
                    "points": meta.get("points", []),
                    "size": list((pages[0] if pages else image).size),
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
