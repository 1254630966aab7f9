"""Test-server files: a split without answers is not scored here but written for the benchmark's server.

Formats, as each server documents them (one entry per question, ids as integers):

* DocVQA and InfographicVQA, RRC (rrc.cvc.uab.es): ``[{"questionId": int, "answer": str}, ...]``
* TextVQA, EvalAI: ``[{"question_id": int, "answer": str}, ...]``

The answer is the text the task would score (the same cleaning), so a server's number and ours
agree on the validation split. The file goes next to ``results.json`` as ``{task}_submission.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from .tasks import docvqa, textvqa
from .tasks.base import EvalDataError, Record

# task -> (id key the server reads, server name, response -> answer)
FORMATS: dict[str, tuple[str, str, Callable[[str, bool], str]]] = {
    "docvqa": ("questionId", "RRC", docvqa.answer),
    "infovqa": ("questionId", "RRC", docvqa.answer),
    "textvqa": ("question_id", "EvalAI", textvqa.answer),
}


def is_test_split(records: Sequence[Record]) -> bool:
    """True when no record has a gold answer (a test split)."""
    return bool(records) and not any(r.answers for r in records)


def _int_id(record: Record, task: str) -> int:
    try:
        return int(record.id)
    except ValueError:
        raise EvalDataError(
            f"task {task}: question id {record.id!r} ({record.source}) is not an integer; the server needs "
            "the dataset's own integer ids"
        ) from None


def write_submission(
    task: str, records: Sequence[Record], cached: dict[str, dict], molmo: bool, out: Path
) -> Path:
    """Write ``out/{task}_submission.json`` from the cached responses, validated before returning."""
    if task not in FORMATS:
        raise EvalDataError(
            f"task {task}: the data has no answers and mmsmall knows no test server for it; "
            f"test-server files are written for {', '.join(sorted(FORMATS))}"
        )
    key, _, answer = FORMATS[task]
    entries = [{key: _int_id(r, task), "answer": answer(cached[r.id]["response"], molmo)} for r in records]
    path = Path(out) / f"{task}_submission.json"
    path.write_text(json.dumps(entries, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    validate_submission(path, task, [_int_id(r, task) for r in records])
    return path


def validate_submission(path: Path, task: str, question_ids: Sequence[int]) -> None:
    """Check ``path`` against the server's format: a list of {id key: int, "answer": str}, one per question."""
    key, server, _ = FORMATS[task]
    entries = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise EvalDataError(f"{path}: {server} expects a JSON list, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != {key, "answer"}:
            raise EvalDataError(
                f"{path}[{i}]: {server} expects exactly the keys {key!r}, 'answer'; got {e!r:.80}"
            )
        if not isinstance(e[key], int) or isinstance(e[key], bool) or not isinstance(e["answer"], str):
            raise EvalDataError(f"{path}[{i}]: {key} must be an int and answer a string; got {e!r:.80}")
    got = [e[key] for e in entries]
    if len(set(got)) != len(got) or sorted(got) != sorted(question_ids):
        raise EvalDataError(
            f"{path}: {len(got)} entries ({len(set(got))} distinct ids) for {len(question_ids)} questions; "
            f"{server} needs exactly one entry per question"
        )
