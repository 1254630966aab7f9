"""OCRBench: substring match per question; the published score is the count out of 1000.

Data: ``echo840/OCRBench`` parquet layout (columns question, answer (str or list), dataset,
question_type, image). Reports ``accuracy`` (the mean, = final score / 1000 on the full set),
``final_score`` (the count) and per-category counts.
"""

from __future__ import annotations

from ..answers import strip_reasoning
from ..metrics import ocrbench_score
from .base import Record, Task, register
from .common import clean, parquet_records


def load(path: str, limit: int | None = None) -> list[Record]:
    return parquet_records(
        path,
        columns=["question", "answer", "dataset", "question_type", "image"],
        id_column=None,
        answer_column="answer",
        split="test",
        limit=limit,
        meta_columns=("dataset", "question_type"),
        question=lambda row: str(row["question"]).strip(),
    )


def prompt(record: Record, molmo: bool) -> str:
    return record.question


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    pred = clean(raw, molmo) if molmo else strip_reasoning(raw)
    s = ocrbench_score(pred, record.answers, dataset=str(record.meta.get("dataset", "")))
    return {"accuracy": s, f"count/{record.meta.get('question_type', 'unknown')}": s}


def aggregate(per_sample: list[dict[str, float]]) -> dict[str, float]:
    total = sum(s["accuracy"] for s in per_sample)
    out = {"accuracy": total / len(per_sample) if per_sample else 0.0, "final_score": float(total)}
    for s in per_sample:
        for k, v in s.items():
            if k.startswith("count/"):
                out[k] = out.get(k, 0.0) + v
    return out


TASK = register(
    Task(
        name="ocrbench",
        load=load,
        prompt=prompt,
        score=score,
        primary="accuracy",
        max_new_tokens=128,
        default_data="echo840/OCRBench",
        split="test",
        molmo_style=None,
        aggregate=aggregate,
        description="OCRBench, substring match (final score = count of 1000)",
    )
)
