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


def shard_task(
    name: str,
    kinds: tuple[str, ...],
    metric_key: str,
    metric: Callable[[str, list[str]], float] | None,
    *,
    max_new_tokens: int,
    molmo_style: str | None,
    description: str,
    scorer=None,
    primary: str | None = None,
):
    """A held-out synthetic task read from our webdataset shards (``data_tools.synth`` output).

    The sample's own question is asked (the training format, no suffix); ``--data NAME=DIR``
    names the shard folder (there is no default). ``metric(cleaned_response, answers)`` scores it,
    or ``scorer(raw, record, molmo)`` when given.
    """
    from .base import Task
    from .loaders import read_shard_records

    def load(path: str, limit: int | None = None) -> list[Record]:
        return read_shard_records(path, kinds, name, limit)

    def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
        return {metric_key: metric(clean(raw, molmo), record.answers)}

    return Task(
        name=name,
        load=load,
        prompt=lambda record, molmo: record.question,
        score=scorer or score,
        primary=primary or metric_key,
        max_new_tokens=max_new_tokens,
        molmo_style=molmo_style,
        description=description,
    )
