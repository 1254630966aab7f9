"""Runner mechanics: scores, the prediction cache and resume, blind mode, bad input, reports, CLI.

The model here is a deterministic lookup (a test double for ``Predictor`` only; the real tiny
model is exercised in test_eval_model.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_eval_tasks import (
    make_ai2d,
    make_chartqa_json,
    make_chartqa_parquet,
    make_docvqa_parquet,
    make_pointing,
)

from eval.__main__ import build_parser, parse_data
from eval.report import compare, markdown_table
from eval.runner import PredictorLike, evaluate
from eval.tasks import EvalDataError

CHART_ANSWERS = {  # question -> answer; golds are 5, 15, 25, 35, 45, 55
    "What is the value of bar 0?": "5",
    "What is the value of bar 1?": "15.5",  # within 5%
    "What is the value of bar 2?": "<think>maybe 20</think> 25",
    "What is the value of bar 3?": "thirty-five",  # wrong
}


class LookupPredictor:
    """Answers by question text (ignoring the prompt suffix); 'grey' for a blank image."""

    def __init__(self, answers: dict[str, str], fail_on_call: int | None = None):
        self.answers = answers
        self.fail_on_call = fail_on_call
        self.calls: list[int] = []
        self.seen_sizes: list[tuple[int, int]] = []

    def predict(self, images, questions, max_new_tokens, task=None):
        self.calls.append(len(questions))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash mid-run")
        out = []
        for im, q in zip(images, questions):
            self.seen_sizes.append(im.size)
            if np.asarray(im).std() == 0 and np.asarray(im)[0, 0, 0] == 128:
                out.append("grey")
                continue
            out.append(self.answers.get(q.split("\n")[0], "\x00garbage <point x= ## 💥"))
        return out


def test_predictor_protocol():
    assert isinstance(LookupPredictor({}), PredictorLike)


def test_scores_and_files(tmp_path):
    data = make_chartqa_parquet(tmp_path / "chartqa")
    pred = LookupPredictor(CHART_ANSWERS)
    res = evaluate(
        pred, ["chartqa"], tmp_path / "out", batch_size=4, data={"chartqa": str(data)}, num_workers=0
    )
    m = res["tasks"]["chartqa"]["metrics"]
    # human (even) samples 0, 2, 4 -> right, right, wrong; augmented 1, 3, 5 -> right, wrong, wrong
    assert m["relaxed_overall"] == pytest.approx(3 / 6)
    assert m["relaxed_human_split"] == pytest.approx(2 / 3) and m["relaxed_augmented_split"] == pytest.approx(
        1 / 3
    )
    assert res["tasks"]["chartqa"]["score"] == pytest.approx(50.0)
    assert pred.calls == [4, 2]
    lines = (tmp_path / "out" / "predictions" / "chartqa.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["size"] == [40, 30]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["chartqa"]["n"] == 6
    assert "| chartqa (relaxed_overall) |" in (tmp_path / "out" / "results.md").read_text()
    samples = [
        json.loads(x) for x in (tmp_path / "out" / "samples" / "chartqa.jsonl").read_text().splitlines()
    ]
    assert samples[2]["scores"]["relaxed_overall"] == 1.0


def test_resume_after_crash_gives_identical_scores(tmp_path):
    data = {"chartqa": str(make_chartqa_parquet(tmp_path / "chartqa"))}
    full = evaluate(LookupPredictor(CHART_ANSWERS), ["chartqa"], tmp_path / "full", batch_size=2, data=data,
                    num_workers=0)  # fmt: skip

    crashing = LookupPredictor(CHART_ANSWERS, fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(crashing, ["chartqa"], tmp_path / "resumed", batch_size=2, data=data, num_workers=0)
    cache = tmp_path / "resumed" / "predictions" / "chartqa.jsonl"
    assert len(cache.read_text().splitlines()) == 4  # two batches made it to disk
    with open(cache, "a") as f:  # and a torn line, as a kill during a write leaves
        f.write('{"id": "000004", "respo')

    again = LookupPredictor(CHART_ANSWERS)
    resumed = evaluate(again, ["chartqa"], tmp_path / "resumed", batch_size=2, data=data, num_workers=0)
    assert again.calls == [2]  # only the last two samples were generated
    assert resumed["tasks"]["chartqa"]["n_generated"] == 2
    assert resumed["tasks"]["chartqa"]["metrics"] == full["tasks"]["chartqa"]["metrics"]
    # a third run generates nothing
    idle = LookupPredictor(CHART_ANSWERS)
    evaluate(idle, ["chartqa"], tmp_path / "resumed", batch_size=2, data=data, num_workers=0)
    assert idle.calls == []


def test_cache_with_other_settings_is_refused(tmp_path):
    data = {"chartqa": str(make_chartqa_parquet(tmp_path / "chartqa"))}
    evaluate(LookupPredictor({}), ["chartqa"], tmp_path / "out", limit=2, data=data, num_workers=0)
    with pytest.raises(EvalDataError, match="predictions were made with"):
        evaluate(
            LookupPredictor({}), ["chartqa"], tmp_path / "out", limit=2, data=data, num_workers=0, blind=True
        )


def test_blind_and_limit_and_workers(tmp_path):
    data = {"chartqa": str(make_chartqa_json(tmp_path / "c")), "ai2d": str(make_ai2d(tmp_path / "a"))}
    pred = LookupPredictor({})
    res = evaluate(pred, ["chartqa", "ai2d"], tmp_path / "out", limit=2, data=data, blind=True, num_workers=2)
    assert res["blind"] is True
    assert res["tasks"]["chartqa"]["n"] == 2 and res["tasks"]["ai2d"]["n"] == 2
    assert set(pred.seen_sizes) == {(40, 30)}  # blanks keep the image size
    samples = (tmp_path / "out" / "samples" / "ai2d.jsonl").read_text().splitlines()
    assert all(json.loads(s)["response"] == "grey" for s in samples)


def test_garbage_output_scores_zero_on_every_task(tmp_path):
    make_docvqa_parquet(tmp_path / "doc")
    data = {
        "chartqa": str(make_chartqa_parquet(tmp_path / "c")),
        "docvqa": str(tmp_path / "doc"),
        "ai2d": str(make_ai2d(tmp_path / "a")),
        "pointing": str(make_pointing(tmp_path / "p")),
    }
    res = evaluate(LookupPredictor({}), list(data), tmp_path / "out", data=data, num_workers=0)
    assert res["tasks"]["chartqa"]["score"] == 0.0
    assert res["tasks"]["docvqa"]["score"] == 0.0
    assert res["tasks"]["ai2d"]["score"] == 0.0
    # pointing: garbage holds no points: 0 on the one-mask question, and right on the question whose
    # gold list is empty (pointing at nothing is the right answer there)
    assert res["tasks"]["pointing"]["metrics"] == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "points_outside": 0.0,
        "read_molmo2": 0.0,  # no answer held pointing text of either format
        "read_molmo": 0.0,
    }


def test_missing_image_fails_naming_the_sample(tmp_path):
    root = make_chartqa_json(tmp_path / "c")
    (root / "test" / "png" / "b.png").unlink()
    with pytest.raises(EvalDataError, match="augmented_test/00000"):
        evaluate(
            LookupPredictor({}), ["chartqa"], tmp_path / "out", data={"chartqa": str(root)}, num_workers=0
        )


def test_argument_errors(tmp_path):
    with pytest.raises(KeyError, match="unknown eval task 'nope'"):
        evaluate(LookupPredictor({}), ["nope"], tmp_path / "o")
    with pytest.raises(ValueError, match="not being run"):
        evaluate(LookupPredictor({}), ["chartqa"], tmp_path / "o", data={"docvqa": "x"})
    with pytest.raises(EvalDataError, match="--data synth_charts=PATH"):
        evaluate(LookupPredictor({}), ["synth_charts"], tmp_path / "o")


def test_cli_parsing():
    args = build_parser().parse_args(
        [
            "--model",
            "m",
            "--tasks",
            "chartqa,docvqa",
            "--out",
            "o",
            "--data",
            "chartqa=/a,docvqa=/b",
            "--no-blind",
        ]
    )
    assert args.blind is False and args.batch_size == 8 and args.limit is None
    assert build_parser().parse_args(["--model", "m", "--tasks", "t", "--out", "o", "--blind"]).blind is True
    assert parse_data(args.data) == {"chartqa": "/a", "docvqa": "/b"}
    with pytest.raises(SystemExit):
        parse_data(["chartqa"])


def test_compare_chart(tmp_path):
    a = {
        "model": "runs/a",
        "blind": False,
        "tasks": {"chartqa": {"primary": "relaxed_overall", "score": 40.0}},
    }
    b = {"model": "runs/b", "blind": True, "tasks": {"chartqa": {"primary": "relaxed_overall", "score": 10.0},
                                                     "docvqa": {"primary": "anls", "score": 5.0}}}  # fmt: skip
    paths = []
    for name, r in (("a", a), ("b", b)):
        p = tmp_path / name / "results.json"
        p.parent.mkdir()
        p.write_text(json.dumps(r))
        paths.append(p)
    png = compare(paths, tmp_path / "cmp.png")
    with Image.open(png) as im:
        assert im.size[0] > 300
    table = markdown_table([a, b])
    assert "| runs/b (blind) | 10.0 | 5.0 |" in table and "| runs/a | 40.0 | – |" in table


class TaskRecordingPredictor(LookupPredictor):
    def predict(self, images, questions, max_new_tokens, task=None):
        self.tasks = getattr(self, "tasks", []) + [task]
        self.questions = getattr(self, "questions", []) + list(questions)
        return [f"Let me see. Answer: {self.answers.get(q, 'x')}" for q in questions]


def test_molmo_style(tmp_path):
    data = {"chartqa": str(make_chartqa_parquet(tmp_path / "c", n=2))}
    pred = TaskRecordingPredictor(CHART_ANSWERS)
    res = evaluate(pred, ["chartqa"], tmp_path / "m", data=data, num_workers=0, molmo_style=True)
    assert set(pred.tasks) == {"chart_qa"} and pred.questions[0] == "What is the value of bar 0?"
    assert res["prompt_style"] == "molmo" and res["tasks"]["chartqa"]["score"] == 100.0  # "Answer:" rule
    lmms = evaluate(
        TaskRecordingPredictor(CHART_ANSWERS), ["chartqa"], tmp_path / "l", data=data, num_workers=0
    )
    assert lmms["tasks"]["chartqa"]["score"] == 0.0  # lmms-eval scores the whole response


class ColourReader:
    """Reads the chartqa fixture's answer off its image (image i is red 10*i, its answer 10*i + 5):
    right exactly when it sees the question's own image."""

    def predict(self, images, questions, max_new_tokens, task=None):
        return [str(int(np.asarray(im)[0, 0, 0]) + 5) for im in images]


def test_other_images_ask_each_question_about_another_samples_image(tmp_path):
    data = {"chartqa": str(make_chartqa_parquet(tmp_path / "c"))}  # 6 samples, answers 5, 15, ..., 55
    own = evaluate(ColourReader(), ["chartqa"], tmp_path / "own", data=data, num_workers=0)
    other = evaluate(
        ColourReader(), ["chartqa"], tmp_path / "other", data=data, num_workers=0, other_images=True
    )
    assert own["tasks"]["chartqa"]["score"] == 100.0
    assert other["other_images"] is True and other["tasks"]["chartqa"]["score"] == 0.0
    samples = [
        json.loads(x) for x in (tmp_path / "other" / "samples" / "chartqa.jsonl").read_text().splitlines()
    ]
    # sample k saw the image of sample k + 3 (half the set away, wrapping): a fixed derangement
    assert [s["response"] for s in samples] == [str(10 * ((k + 3) % 6) + 5) for k in range(6)]
    assert "| chartqa (relaxed_overall) |" in markdown_table(other) and "(other images)" in markdown_table(
        other
    )
    # never mixed with own-image answers in one cache
    with pytest.raises(EvalDataError, match="predictions were made with"):
        evaluate(ColourReader(), ["chartqa"], tmp_path / "own", data=data, num_workers=0, other_images=True)
    from mmsmall.config import ConfigError

    with pytest.raises(ConfigError, match="choose one"):
        evaluate(ColourReader(), ["chartqa"], tmp_path / "x", data=data, blind=True, other_images=True)
    assert build_parser().parse_args(["--model", "m", "--tasks", "chartqa", "--other-images"]).other_images
    one = {"chartqa": str(make_chartqa_parquet(tmp_path / "one", n=1))}  # no other image to ask about
    with pytest.raises(EvalDataError, match="other_images needs at least 2 samples"):
        evaluate(ColourReader(), ["chartqa"], tmp_path / "o1", data=one, num_workers=0, other_images=True)


def test_chance_is_the_best_score_of_one_fixed_answer(tmp_path):
    from test_eval_tasks import img_cell, write_parquet

    from eval.baselines import chance

    answers = ["7", "7", "7", "3", "3", "90"]
    write_parquet(
        tmp_path / "c" / "data" / "test-00000-of-00001.parquet",
        {
            "question": [f"q{i}?" for i in range(6)],
            "answer": answers,
            "type": ["human_test"] * 6,
            "image": [img_cell(i) for i in range(6)],
        },
    )
    level = chance("chartqa", str(tmp_path / "c"))
    assert level == {"score": 50.0, "answer": "7", "n": 6, "n_candidates": 3}  # the majority answer, 3 of 6
    assert chance("chartqa", str(tmp_path / "c"), limit=5)["score"] == 60.0


def test_chartqa_with_one_split_says_so(tmp_path):
    root = make_chartqa_json(tmp_path / "c")
    (root / "test" / "test_augmented.json").unlink()
    res = evaluate(
        LookupPredictor({}), ["chartqa"], tmp_path / "out", data={"chartqa": str(root)}, num_workers=0
    )
    note = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["chartqa"]["note"]
    assert res["tasks"]["chartqa"]["n"] == 1 and "only the human_test split" in note
    both = evaluate(
        LookupPredictor({}),
        ["chartqa"],
        tmp_path / "both",
        data={"chartqa": str(make_chartqa_json(tmp_path / "b"))},
        num_workers=0,
    )
    assert "note" not in both["tasks"]["chartqa"]
