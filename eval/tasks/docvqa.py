"""DocVQA validation: ANLS.

Data: the lmms-eval parquet layout (``lmms-lab-encoder/DocVQA``, config ``DocVQA``; columns
questionId, question, answers, image), or the RRC json (``val_v1.0.json``:
``{"dataset_name", "dataset_split", "data": [{"questionId", "question", "image":
"documents/....png", "answers", ...}]}``) with images relative to the json's folder. An RRC
file without answers (the test split) loads with empty answers; the runner then writes the RRC
submission file instead of a score (eval/submission.py).
"""

from __future__ import annotations

from pathlib import Path

from ..metrics import anls
from .base import EvalDataError, Record, Task, register
from .common import SHORT_ANSWER, clean, parquet_records
from .loaders import answers_list, read_json


def load_rrc_json(path: Path, limit: int | None = None, image_keys=("image",)) -> list[Record]:
    """Records from an RRC DocVQA / InfographicVQA annotation file."""
    if path.is_dir():
        found = sorted(path.glob("*.json"))
        if len(found) != 1:
            raise EvalDataError(
                f"{path}: expected exactly one RRC *.json annotation file, found {len(found)}"
            )
        path = found[0]
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise EvalDataError(f"{path}: expected an RRC file {{'dataset_name', 'data': [...]}}; no 'data' list")
    records = []
    for i, item in enumerate(doc["data"]):
        if not isinstance(item, dict) or "question" not in item:
            raise EvalDataError(f"{path}: data[{i}] is not a question object: {item!r:.120}")
        rid = str(item.get("questionId", i))
        if ("answers" in item) != ("answers" in doc["data"][0]):
            raise EvalDataError(
                f"{path}: question {rid} {'lacks' if 'answers' not in item else 'has'} 'answers' unlike "
                "question 0; a file is either a scored split (every question answered) or a test split (none)"
            )
        image = next((item[k] for k in image_keys if item.get(k)), None)
        if image is None:
            raise EvalDataError(f"{path}: question {rid} names no image (keys tried: {list(image_keys)})")
        records.append(
            Record(
                id=rid,
                question=str(item["question"]),
                answers=answers_list(item["answers"], rid, str(path)) if "answers" in item else [],
                image_path=str(path.parent / image),
                source=str(path),
            )
        )
        if limit is not None and len(records) >= limit:
            break
    return records


def loader(config: str, image_keys: tuple[str, ...]):
    def load(path: str, limit: int | None = None) -> list[Record]:
        p = Path(path)
        if p.suffix == ".json" or (p.is_dir() and any(p.glob("*.json")) and not any(p.rglob("*.parquet"))):
            return load_rrc_json(p, limit, image_keys)
        return parquet_records(
            path,
            columns=["questionId", "question", "answers", "image"],
            id_column="questionId",
            answer_column="answers",
            split="validation",
            config=config,
            limit=limit,
        )

    return load


def prompt(record: Record, molmo: bool) -> str:
    return record.question if molmo else f"{record.question}{SHORT_ANSWER}"


def answer(raw: str, molmo: bool = False) -> str:
    """The answer scored (and sent to the RRC server for test splits)."""
    return clean(raw, molmo)


def score(raw: str, record: Record, molmo: bool = False) -> dict[str, float]:
    return {"anls": anls(answer(raw, molmo), record.answers)}


TASK = register(
    Task(
        name="docvqa",
        load=loader("DocVQA", ("image",)),
        prompt=prompt,
        score=score,
        primary="anls",
        max_new_tokens=32,
        default_data="lmms-lab-encoder/DocVQA",
        split="validation",
        molmo_style="doc_qa",
        description="DocVQA validation, ANLS",
    )
)
