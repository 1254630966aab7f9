"""TextVQA validation: VQA accuracy with the EvalAI answer normalization.

Data: lmms-eval parquet layout (``lmms-lab-encoder/textvqa``; columns question_id, question,
answers (10), image), or the official TextVQA json with its image folders (see ``load_json``). The question is ``.capitalize()``-d as lmms-eval does. lmms-eval leaves the
token budget to each model wrapper (16 to 1024); we pin 32, ample for its one-word/phrase answers.
"""

from __future__ import annotations

from pathlib import Path

from ..answers import strip_reasoning
from ..metrics import vqa_accuracy
from .base import EvalDataError, Record, Task, register
from .common import SHORT_ANSWER, clean, parquet_records
from .loaders import answers_list, read_json


def load_json(path: Path, limit: int | None = None) -> list[Record]:
    """The official TextVQA json (``{"data": [{"question_id", "question", "image_id", "answers"?}]}``),
    images ``{image_id}.jpg`` in ``train_images/`` (val), ``test_images/`` or beside the json. The
    test split has no answers: its records get none, and the runner writes the EvalAI file."""
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) != 1:
            raise EvalDataError(f"{path}: expected exactly one TextVQA *.json file, found {len(found)}")
        path = found[0]
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list) or not doc["data"]:
        raise EvalDataError(f"{path}: expected a TextVQA file {{'data': [...]}} with questions")
    scored = "answers" in doc["data"][0]
    records = []
    for i, item in enumerate(doc["data"][:limit] if limit else doc["data"]):
        rid = str(item.get("question_id", i))
        if ("answers" in item) != scored:
            raise EvalDataError(f"{path}: question {rid}: answers on some questions but not others")
        image = next(
            (p for d in _IMAGE_DIRS if (p := path.parent / d / f"{item['image_id']}.jpg").exists()),
            path.parent / _IMAGE_DIRS[0] / f"{item['image_id']}.jpg",
        )
        answers = answers_list(item["answers"], rid, str(path)) if scored else []
        records.append(
            Record(
                id=rid,
                question=str(item["question"]),
                answers=answers,
                image_path=str(image),
                source=str(path),
            )
        )
    return records


_IMAGE_DIRS = ("train_images", "test_images", "images", ".")


def load(path: str, limit: int | None = None) -> list[Record]:
    p = Path(path)
    if p.suffix == ".json" or (p.is_dir() and any(p.glob("*.json")) and not any(p.rglob("*.parquet"))):
        return load_json(p, limit)
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


def answer(raw: str, molmo: bool = False) -> str:
    """The answer scored (and sent to EvalAI for the test split)."""
    return clean(raw, molmo) if molmo else strip_reasoning(raw)


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    return {"vqa_accuracy": vqa_accuracy(answer(raw, molmo), record.answers)}


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
