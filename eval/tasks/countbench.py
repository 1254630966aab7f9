"""CountBenchQA: counting accuracy (lmms-eval ``countbench`` settings).

Data: ``vikhyatk/CountBenchQA`` parquet layout (columns question, number, image). The prompt is
lmms-eval's ``countbench`` one (the caption column is not shown: it often states the count).
Reports ``accuracy`` (number words up to twenty accepted) and ``exact`` (the
``countbenchqa`` rule: the stripped answer equals the number's digits).
"""

from __future__ import annotations

from ..answers import strip_reasoning
from ..metrics import count_exact, countbench_accuracy
from .base import Record, Task, register
from .common import clean, parquet_records

PREFIX = "Look at the image carefully and count the objects. Answer with just a number, without any additional text. "


def load(path: str, limit: int | None = None) -> list[Record]:
    return parquet_records(
        path,
        columns=["question", "number", "image"],
        id_column=None,
        answer_column="number",
        split="test",
        limit=limit,
        question=lambda row: str(row["question"]).strip(),
    )


def prompt(record: Record, molmo: bool) -> str:
    return record.question if molmo else f"{PREFIX}{record.question}"


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    pred = clean(raw, molmo) if molmo else strip_reasoning(raw)
    return {"accuracy": countbench_accuracy(pred, record.answers), "exact": count_exact(pred, record.answers)}


TASK = register(
    Task(
        name="countbench",
        load=load,
        prompt=prompt,
        score=score,
        primary="accuracy",
        max_new_tokens=16,
        default_data="vikhyatk/CountBenchQA",
        split="test",
        molmo_style="counting",
        description="CountBenchQA, count accuracy",
    )
)
