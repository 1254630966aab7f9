"""Pieces several benchmark files share: response cleaning and the plain parquet VQA loader."""

from __future__ import annotations

from collections.abc import Callable

from ..answers import clean_response
from .base import Record
from .loaders import answers_list, image_fields, iter_rows

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def clean(raw: str, molmo: bool) -> str:
    """lmms-eval's cleaning (reasoning blocks removed, stripped); Molmo's ``Answer:`` rule on top."""
    return clean_response(raw, molmo=molmo)


def parquet_records(
    path: str,
    *,
    columns: list[str],
    id_column: str | None,
    answer_column: str,
    split: str | None,
    config: str | None = None,
    limit: int | None = None,
    meta_columns: tuple[str, ...] = (),
    question: Callable[[dict], str] = lambda row: row["question"],
) -> list[Record]:
    """Records from an lmms-eval parquet layout with an ``image`` column."""
    records = []
    for row, source, index in iter_rows(path, columns, split=split, config=config, limit=limit):
        rid = str(row[id_column]) if id_column else f"{index:06d}"
        records.append(
            Record(
                id=rid,
                question=question(row),
                answers=answers_list(row[answer_column], rid, source),
                meta={c: row[c] for c in meta_columns},
                source=source,
                **image_fields(row.get("image"), source, rid),
            )
        )
    return records
