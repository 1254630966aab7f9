"""AI2D test: multiple choice scored by the option letter.

Data: lmms-eval parquet layout (``lmms-lab-encoder/ai2d``; columns question, options (list),
answer (the index as a string), image). The prompt lists the options as ``A. ...`` lines.
"""

from __future__ import annotations

from ..answers import after_answer, strip_reasoning
from ..metrics import option_letter, option_match
from .base import EvalDataError, Record, Task, register
from .common import parquet_records

SUFFIX = "\nAnswer with the option's letter from the given choices directly."


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def load(path: str, limit: int | None = None) -> list[Record]:
    records = parquet_records(
        path,
        columns=["question", "options", "answer", "image"],
        id_column=None,
        answer_column="answer",
        split="test",
        limit=limit,
        meta_columns=("options",),
    )
    for r in records:
        options = r.meta["options"]
        try:
            index = int(r.answers[0])
            letter = _letters(len(options))[index]
        except (ValueError, IndexError, TypeError):
            raise EvalDataError(
                f"sample {r.id!r} in {r.source}: answer {r.answers[0]!r} is not an index into its "
                f"{len(options or [])} options"
            ) from None
        r.answers = [letter]
    return records


def prompt(record: Record, molmo: bool) -> str:
    options = record.meta["options"]
    choices = "\n".join(f"{letter}. {text}" for letter, text in zip(_letters(len(options)), options))
    return f"{record.question}\n{choices}" + ("" if molmo else SUFFIX)


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    """lmms-eval order: the letter filter sees the raw text, then reasoning tags are stripped."""
    if molmo:
        pred = option_letter(after_answer(strip_reasoning(raw)))
    else:
        pred = strip_reasoning(option_letter(raw))
    return {"accuracy": option_match(pred.strip(), record.answers)}


TASK = register(
    Task(
        name="ai2d",
        load=load,
        prompt=prompt,
        score=score,
        primary="accuracy",
        max_new_tokens=16,
        default_data="lmms-lab-encoder/ai2d",
        split="test",
        molmo_style="vqa",
        description="AI2D test, option-letter exact match",
    )
)
