"""TextVQA validation: VQA accuracy with the EvalAI answer normalization.

Data: lmms-eval parquet layout (``lmms-lab-encoder/textvqa``; columns question_id, question,
answers (10), image). The question is ``.capitalize()``-d as lmms-eval does. lmms-eval leaves the
token budget to each model wrapper (16 to 1024); we pin 32, ample for its one-word/phrase answers.
"""

from __future__ import annotations

from ..answers import strip_reasoning
from ..metrics import vqa_accuracy
from .base import Record, Task, register
from .common import SHORT_ANSWER, clean, parquet_records


def load(path: str, limit: int | None = None) -> list[Record]:
    return parquet_records(
        path,
        columns=["question_id", "question", "answers", "image"],
        id_column="question_id",
        answer_column="answers",
        split="validation",
        limit=limit,
    )


def prompt(record: Record, molmo: bool) -> str:
    return record.question if molmo else f"{record.question.capitalize()}{SHORT_ANSWER}"


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    pred = clean(raw, molmo) if molmo else strip_reasoning(raw)
    return {"vqa_accuracy": vqa_accuracy(pred, record.answers)}


TASK = register(
    Task(
        name="textvqa",
        load=load,
        prompt=prompt,
        score=score,
        primary="vqa_accuracy",
        max_new_tokens=32,
        default_data="lmms-lab-encoder/textvqa",
        split="validation",
        molmo_style="vqa",
        description="TextVQA validation, VQA accuracy (EvalAI normalization)",
    )
)
