"""Test splits (no answers) of DocVQA / InfoVQA (RRC json) and TextVQA (official json) are not scored:
the runner writes each server's submission file next to results.json, validated against the format
the server documents (keys, types, one entry per question)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.runner import evaluate
from eval.submission import validate_submission
from eval.tasks.base import EvalDataError
from mmsmall.config import ModelConfig, load_config
from mmsmall.inference.predictor import Predictor
from mmsmall.model.vlm import VLM
from mmsmall.processing.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _img(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(40 + seed, 60, 3) * 255).astype(np.uint8)).save(path)


def _rrc(root: Path, ids: list[int]) -> Path:
    data = []
    for i, qid in enumerate(ids):
        _img(root / "documents" / f"d{i}.png", i)
        data.append({"questionId": qid, "question": "What is the date?", "image": f"documents/d{i}.png"})
    (root / "test_v1.0.json").write_text(
        json.dumps({"dataset_name": "x", "dataset_split": "test", "data": data})
    )
    return root


def _textvqa(root: Path, ids: list[int]) -> Path:
    data = []
    for i, qid in enumerate(ids):
        _img(root / "test_images" / f"img{i}.jpg", i)
        data.append({"question_id": qid, "question": "what brand is this?", "image_id": f"img{i}"})
    (root / "TextVQA_0.5.1_test.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    return root


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny-molmo2.yaml", cls=ModelConfig)
    return Predictor(VLM(cfg, build_tokenizer(cfg.tokenizer)))


def test_test_splits_write_server_files(tmp_path, predictor):
    doc_ids, info_ids, text_ids = [57349, 57350, 6], [98, 99], [34602, 34603, 34604]
    data = {
        "docvqa": str(_rrc(tmp_path / "docvqa", doc_ids)),
        "infovqa": str(_rrc(tmp_path / "infovqa", info_ids)),
        "textvqa": str(_textvqa(tmp_path / "textvqa", text_ids)),
    }
    out = tmp_path / "out"
    results = evaluate(
        predictor, list(data), out, batch_size=2, data=data, num_workers=0, show_progress=False
    )
    assert results["tasks"] == {}  # nothing scored locally
    for task, key, ids in (("docvqa", "questionId", doc_ids), ("infovqa", "questionId", info_ids),
                           ("textvqa", "question_id", text_ids)):  # fmt: skip
        sub = out / f"{task}_submission.json"
        assert results["submissions"][task] == {"file": sub.name, "n": len(ids), "data": data[task]}
        entries = json.loads(sub.read_text())
        assert [e[key] for e in entries] == ids  # one entry per question, the dataset's integer ids
        assert all(set(e) == {key, "answer"} and isinstance(e["answer"], str) for e in entries)
        responses = [
            json.loads(x)["response"]
            for x in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()
        ]
        assert [e["answer"] for e in entries] == [r.strip() for r in responses]
    assert json.loads((out / "results.json").read_text())["submissions"]["textvqa"]["n"] == 3

    # the validator is sharp: a duplicate, a string id, a missing question are each refused
    sub = out / "docvqa_submission.json"
    good = json.loads(sub.read_text())
    for bad in (good + good[:1], [{**good[0], "questionId": "57349"}, *good[1:]], good[:-1]):
        sub.write_text(json.dumps(bad))
        with pytest.raises(EvalDataError):
            validate_submission(sub, "docvqa", doc_ids)


def test_split_with_some_answers_is_refused(tmp_path):
    from eval.tasks.base import get_task

    root = _rrc(tmp_path / "d", [1, 2])
    doc = json.loads((root / "test_v1.0.json").read_text())
    doc["data"][1]["answers"] = ["x"]
    (root / "test_v1.0.json").write_text(json.dumps(doc))
    with pytest.raises(EvalDataError, match="either a scored split"):
        get_task("docvqa").load(str(root), None)
