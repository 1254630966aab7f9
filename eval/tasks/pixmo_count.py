"""PixMo-Count test: count accuracy (first number in the answer vs the gold count).

Data: the lmms-eval parquet layout (``kcz358/pixmo-count``; columns question, answer, image).
"""

from __future__ import annotations

from ..answers import strip_reasoning
from ..metrics import count_accuracy
from .base import Record, Task, register
from .common import clean, parquet_records

SUFFIX = "\nAnswer with a single number."


def load(path: str, limit: int | None = None) -> list[Record]:
    return parquet_records(
        path,
        columns=["question", "answer", "image"],
        id_column=None,
        answer_column="answer",
        split="test",
        limit=limit,
        question=lambda row: str(row["question"]).replace("<image>", "").strip(),
    )


def prompt(record: Record, molmo: bool) -> str:
    return record.question if molmo else f"{record.question}{SUFFIX}"


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    pred = clean(raw, molmo) if molmo else strip_reasoning(raw)
    return {"accuracy": count_accuracy(pred, record.answers)}


TASK = register(
    Task(
        name="pixmo_count",
        load=load,
        prompt=prompt,
        score=score,
        primary="accuracy",
        max_new_tokens=32,
        default_data="kcz358/pixmo-count",
        split="test",
        molmo_style="counting",
        description="PixMo-Count test, count accuracy",
    )
)
