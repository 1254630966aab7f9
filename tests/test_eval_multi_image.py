"""Multi-image eval tasks (issue 25): MP-DocVQA (lmms-eval ``multidocvqa``) and MuirBench
(lmms-eval ``muirbench``) from local copies laid out like their hub repos, asked about every image
of a question together, through the runner and ``mmsmall eval``.

The fixtures' columns are the ones lmms-eval 0.7.3's task code reads (``tasks/multidocvqa/utils.py``:
``questionId``, ``question``, ``answers`` as a list literal string, ``image_1`` .. ``image_20``;
``tasks/muirbench/utils.py``: ``idx``, ``task``, ``question``, ``options``, ``answer``,
``image_list``, ``image_relation``, ``image_type``); the metrics are checked case by case against
lmms-eval's own functions in test_metrics.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
import torch
from hub_layout import card_features, save_hub_layout

from data_tools.fixtures import natural_image
from eval.runner import evaluate
from eval.tasks import EvalDataError, get_task

ROOT = Path(__file__).resolve().parent.parent
MP_CARD = (
    "features:\n"
    + "".join(
        f"- name: {n}\n  dtype: {t}\n"
        for n, t in [("questionId", "string"), ("question", "string"), ("answers", "string")]
    )
    + "".join(f"- name: image_{i}\n  dtype: image\n" for i in range(1, 21))
)
MUIR_CARD = """features:
- name: idx
  dtype: string
- name: task
  dtype: string
- name: image_relation
  dtype: string
- name: image_type
  dtype: string
- name: question
  dtype: string
- name: options
  sequence: string
- name: answer
  dtype: string
- name: image_list
  sequence: image
"""


def _png(seed: int, size=(64, 48)) -> dict:
    buf = io.BytesIO()
    natural_image(seed, size).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def make_mp_docvqa(root: Path, pages: list[int]) -> Path:
    rows = []
    for q, n in enumerate(pages):
        row = {"questionId": str(100 + q), "question": f"What is the total on document {q}?",
               "answers": repr([f"{10 * q}", f"${10 * q}"])}  # fmt: skip
        row.update(
            {f"image_{i}": _png(10 * q + i, (60 + 7 * i, 80)) if i <= n else None for i in range(1, 21)}
        )
        rows.append(row)
    ds = datasets.Dataset.from_list(rows, features=card_features(MP_CARD))
    return save_hub_layout(datasets.DatasetDict({"val": ds}), root, card_yaml=MP_CARD)


def make_muirbench(root: Path, n_images: list[int]) -> Path:
    rows = [
        {
            "idx": str(k),
            "task": ["Counting", "Visual Retrieval"][k % 2],
            "image_relation": "Multiview",
            "image_type": "Photography",
            "question": f"Which image shows {k}?",
            "options": ["first", "second", "none"],
            "answer": "ABC"[k % 3],
            "image_list": [_png(50 + 10 * k + i) for i in range(m)],
        }  # fmt: skip
        for k, m in enumerate(n_images)
    ]
    ds = datasets.Dataset.from_list(rows, features=card_features(MUIR_CARD))
    return save_hub_layout(datasets.DatasetDict({"test": ds}), root, card_yaml=MUIR_CARD)


def test_mp_docvqa_reads_every_page_in_order(tmp_path):
    task = get_task("multidocvqa")
    recs = task.load(str(make_mp_docvqa(tmp_path / "mp", [3, 1, 20])), None)
    assert [r.id for r in recs] == ["100", "101", "102"]
    assert recs[0].answers == ["0", "$0"]  # the list literal read as a list
    pages = recs[0].load_visual()
    assert [p.size for p in pages] == [(67, 80), (74, 80), (81, 80)]  # image_1, image_2, image_3
    assert len(recs[2].load_visual()) == 20 and len(recs[1].load_visual()) == 1
    assert task.prompt(recs[0], False) == (
        "What is the total on document 0?\nAnswer the question using a single word or phrase."
    )
    assert task.score(" $0 ", recs[0], False) == {"anls": 1.0, "accuracy": 1.0}
    assert task.score("none", recs[0], False) == {"anls": 0.0, "accuracy": 0.0}


def test_muirbench_reads_the_image_list_and_scores_the_letter(tmp_path):
    task = get_task("muirbench")
    recs = task.load(str(make_muirbench(tmp_path / "mb", [2, 4, 9])), None)
    assert [len(r.load_visual()) for r in recs] == [2, 4, 9]
    assert [r.answers for r in recs] == [["A"], ["B"], ["C"]]
    assert task.prompt(recs[1], False) == (
        "Which image shows 1?\nA. first\nB. second\nC. none\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert task.score("B. second", recs[1], False)["accuracy"] == 1.0
    assert task.score("B!", recs[1], False)["accuracy"] == 0.0  # punctuation is not ignored here


def test_a_corrupt_page_names_the_question_and_page(tmp_path):
    task = get_task("multidocvqa")
    rec = task.load(str(make_mp_docvqa(tmp_path / "mp", [3])), None)[0]
    rec.images[1] = {"bytes": b"not a png", "path": None}
    with pytest.raises(EvalDataError, match=r"sample '100 \(image 2 of 3\)'.*cannot be decoded"):
        rec.load_visual()


@pytest.fixture(scope="module")
def predictor():
    from mmsmall.config import ModelConfig, load_config
    from mmsmall.inference.predictor import Predictor
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    return Predictor(VLM(cfg, build_tokenizer(cfg.tokenizer)))


def test_runner_asks_about_all_images_and_equals_the_predictor(tmp_path, predictor):
    data = {
        "multidocvqa": str(make_mp_docvqa(tmp_path / "mp", [3, 1, 2, 4])),
        "muirbench": str(make_muirbench(tmp_path / "mb", [2, 3, 2])),
    }
    res = evaluate(predictor, list(data), tmp_path / "out", data=data, batch_size=3, num_workers=1,
                   max_new_tokens=6, show_progress=False)  # fmt: skip
    for name in data:
        task = get_task(name)
        recs = task.load(data[name], None)
        want = predictor.predict([r.load_visual() for r in recs], [task.prompt(r, False) for r in recs], 6,
                                 batch_size=1)  # fmt: skip
        lines = (tmp_path / "out" / "predictions" / f"{name}.jsonl").read_text().splitlines()
        got = {json.loads(x)["id"]: json.loads(x)["response"] for x in lines}
        assert got == {r.id: w for r, w in zip(recs, want)}
        assert res["tasks"][name]["n"] == len(recs)
    # the baselines take lists too: grey pages of the same sizes, and another question's pages
    mp = {"multidocvqa": data["multidocvqa"]}
    blind = evaluate(predictor, ["multidocvqa"], tmp_path / "blind", data=mp, blind=True, max_new_tokens=6,
                     show_progress=False)  # fmt: skip
    other = evaluate(predictor, ["multidocvqa"], tmp_path / "other", data=mp, other_images=True,
                     max_new_tokens=6, show_progress=False)  # fmt: skip
    assert blind["tasks"]["multidocvqa"]["n"] == other["tasks"]["multidocvqa"]["n"] == 4


def test_list_tasks_names_the_multi_image_tasks():
    from typer.testing import CliRunner

    from mmsmall.cli import app

    out = CliRunner().invoke(app, ["eval", "--list-tasks"])
    rows = {line.split()[0]: line.split()[1] for line in out.output.splitlines() if line.strip()}
    assert rows["multidocvqa"] == "lmms-lab-encoder/MP-DocVQA" and rows["muirbench"] == "MUIRBENCH/MUIRBENCH"


def test_malformed_rows_name_the_sample(tmp_path):
    """A gold list that is not a Python list literal, a question whose pages are all empty, and a
    MuirBench row with no options each stop with the sample and file named."""
    mp = make_mp_docvqa(tmp_path / "mp", [2])
    ds = datasets.load_dataset("parquet", data_files=str(mp / "data" / "val-00000-of-00001.parquet"))["train"]
    bad = ds.map(lambda r: {"answers": "['12'"}).cast(card_features(MP_CARD))
    save_hub_layout(datasets.DatasetDict({"val": bad}), tmp_path / "mp_bad", card_yaml=MP_CARD)
    with pytest.raises(EvalDataError, match=r"sample '100' in .*not a Python list literal"):
        get_task("multidocvqa").load(str(tmp_path / "mp_bad"), None)
    empty = ds.map(lambda r: {f"image_{i}": None for i in range(1, 21)}).cast(card_features(MP_CARD))
    save_hub_layout(datasets.DatasetDict({"val": empty}), tmp_path / "mp_empty", card_yaml=MP_CARD)
    with pytest.raises(EvalDataError, match=r"sample '100' in .*no page images"):
        get_task("multidocvqa").load(str(tmp_path / "mp_empty"), None)
    mb = make_muirbench(tmp_path / "mb", [2])
    rows = datasets.load_dataset("parquet", data_files=str(mb / "data" / "test-00000-of-00001.parquet"))[
        "train"
    ]
    no_options = rows.map(lambda r: {"options": []}).cast(card_features(MUIR_CARD))
    save_hub_layout(datasets.DatasetDict({"test": no_options}), tmp_path / "mb_bad", card_yaml=MUIR_CARD)
    with pytest.raises(EvalDataError, match=r"sample '0' in .*no options"):
        get_task("muirbench").load(str(tmp_path / "mb_bad"), None)
