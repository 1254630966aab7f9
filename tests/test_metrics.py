"""Metrics equal lmms-eval 0.7.3 case by case, and the quirks EVAL_FORMATS.md lists hold.

tests/data/metric_reference.json was produced once by running lmms-eval's own scoring functions
(tests/data/make_metric_reference.py); lmms-eval is not a dependency.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eval import metrics as M
from eval.answers import after_answer, clean_response, most_common_line, strip_reasoning
from eval.tasks import (
    ai2d,
    chartqa,
    countbench,
    docvqa,
    muirbench,
    multidocvqa,
    ocrbench,
    pixmo_count,
    textvqa,
)
from eval.tasks.base import Record

TABLE = json.loads((Path(__file__).parent / "data" / "metric_reference.json").read_text())["cases"]


def _record(case: dict) -> Record:
    return Record(
        id="x", question="q", answers=list(case["answers"]), meta={"dataset": case.get("dataset", "")}
    )


# the lmms-eval pipeline of each metric: our task's scorer on the raw response
PIPELINES = {
    "relaxed_accuracy": lambda c: chartqa.score(c["prediction"], _record(c))["relaxed_overall"],
    "anls": lambda c: docvqa.score(c["prediction"], _record(c))["anls"],
    "vqa_accuracy": lambda c: textvqa.score(c["prediction"], _record(c))["vqa_accuracy"],
    "ai2d": lambda c: ai2d.score(c["prediction"], _record(c))["accuracy"],
    "ocrbench": lambda c: ocrbench.score(c["prediction"], _record(c))["accuracy"],
    "count_exact": lambda c: countbench.score(c["prediction"], _record(c))["exact"],
    "countbench_accuracy": lambda c: countbench.score(c["prediction"], _record(c))["accuracy"],
    "count_accuracy": lambda c: pixmo_count.score(c["prediction"], _record(c))["accuracy"],
    "mp_anls": lambda c: multidocvqa.score(c["prediction"], _record(c))["anls"],
    "mp_accuracy": lambda c: multidocvqa.score(c["prediction"], _record(c))["accuracy"],
    "muirbench": lambda c: muirbench.score(c["prediction"], _record(c))["accuracy"],
    "strip_reasoning": lambda c: strip_reasoning(c["prediction"]),
}

# the bare metric functions, given the cleaned response
FUNCTIONS = {
    "relaxed_accuracy": M.relaxed_accuracy,
    "anls": M.anls,
    "vqa_accuracy": M.vqa_accuracy,
    "count_exact": M.count_exact,
    "countbench_accuracy": M.countbench_accuracy,
    "count_accuracy": M.count_accuracy,
    "mp_anls": M.mp_anls,
    "mp_accuracy": M.mp_accuracy,
}


def test_table_is_large_and_covers_every_metric():
    assert len(TABLE) >= 300
    assert {c["metric"] for c in TABLE} == set(PIPELINES)


@pytest.mark.parametrize("case", TABLE, ids=lambda c: f"{c['metric']}:{c['prediction'][:30]!r}")
def test_reference_table(case):
    got = PIPELINES[case["metric"]](case)
    if isinstance(case["expected"], str):
        assert got == case["expected"]
    else:
        assert got == pytest.approx(case["expected"], abs=1e-12)
    fn = FUNCTIONS.get(case["metric"])
    if fn is not None:
        assert fn(strip_reasoning(case["prediction"]), case["answers"]) == pytest.approx(
            case["expected"], abs=1e-12
        )


# ----------------------------------------------------------------------------- named quirks


@pytest.mark.parametrize(
    "pred,gold,expected",
    [
        ("62%", "62", 0.0),
        ("1,000", "1000", 0.0),
        ("1.05", "1", 0.0),  # float error puts it just over 5%
        ("1.04", "1", 1.0),
        ("0.0", "0", 0.0),
        ("0", "0", 1.0),
        ("2000", "2014", 1.0),  # years get the tolerance
        ("0.62", "62%", 1.0),
        ("Yes", "yes", 1.0),
        ("-5.2", "-5", 1.0),
    ],
)
def test_chartqa_quirks(pred, gold, expected):
    assert M.relaxed_accuracy(pred, [gold]) == expected


def test_relaxed_accuracy_takes_any_gold():
    assert M.relaxed_accuracy("10", ["7", "10.3"]) == 1.0
    assert M.relaxed_accuracy("10", ["7", "abc"]) == 0.0


def test_anls_quirks():
    assert M.anls("abcd", ["abef"]) == 0.5  # exactly 0.5 is kept
    assert M.anls("aaaaa", ["aabbb"]) == 0.0  # below 0.5 becomes 0
    assert M.anls("hello  world", ["Hello World"]) == 1.0  # case and whitespace runs ignored
    assert M.anls("x", ["a", "b", "x"]) == 1.0  # best gold answer
    assert M.anls("", [""]) == 1.0
    # the divisor uses the raw strings: "ab" vs " ab " -> distance 0 anyway; "abc" vs "abcdef" -> 0.5
    assert M.anls("abc", ["abcdef"]) == 0.5


def test_vqa_quirks():
    ten = lambda *xs: list(xs) + ["other"] * (10 - len(xs))  # noqa: E731
    assert M.vqa_accuracy("nokia", ten("nokia", "nokia", "nokia")) == pytest.approx(0.9)
    assert M.vqa_accuracy("nokia", ten(*["nokia"] * 4)) == 1.0
    assert M.vqa_accuracy("two", ten("2", "2", "2")) == pytest.approx(0.9)  # number words
    assert M.vqa_accuracy("the dog", ten("dog", "dog", "dog")) == pytest.approx(0.9)  # articles
    assert M.vqa_accuracy("dont", ten("don't", "don't", "don't")) == pytest.approx(0.9)  # contractions
    assert M.vqa_accuracy("", ten("the", "the", "the")) == pytest.approx(0.9)  # empty matches "the"
    assert M.vqa_accuracy("nokia", ["nokia"]) == 0.0  # a lone gold answer has no others to match
    assert M.normalize_vqa_answer("Yes.") == "yes"
    assert M.normalize_vqa_answer("1.5") == "1.5"


def test_textvqa_prompt_capitalizes():
    r = Record(id="1", question="what brand is THIS?", answers=["a"])
    assert (
        textvqa.prompt(r, False) == "What brand is this?\nAnswer the question using a single word or phrase."
    )


@pytest.mark.parametrize(
    "pred,expected",
    [
        ("(B)", 1.0),
        ("**B**", 1.0),
        ("b", 1.0),
        ("B:", 1.0),
        ("B. dog", 1.0),
        ("The answer is B", 0.0),
        ("C", 0.0),
    ],
)
def test_ai2d_letters(pred, expected):
    assert M.ai2d_accuracy(pred, ["B"]) == expected


def test_ai2d_prompt_lists_options():
    r = Record(id="1", question="Which?", answers=["B"], meta={"options": ["cat", "dog"]})
    assert ai2d.prompt(r, False) == (
        "Which?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    )


def test_ocrbench_quirks():
    assert M.ocrbench_score("10", ["1"]) == 1.0  # substring
    assert M.ocrbench_score("ＨＥＬＬＯ there", ["hello"]) == 1.0  # full-width folded
    assert M.ocrbench_score("x ^ 2", ["x^2"], dataset="HME100k") == 1.0  # spaces removed
    assert M.ocrbench_score("X^2", ["x^2"], dataset="HME100k") == 0.0  # case-sensitive there
    agg = ocrbench.aggregate([{"accuracy": 1.0, "count/a": 1.0}, {"accuracy": 0.0, "count/b": 0.0}])
    assert agg == {"accuracy": 0.5, "final_score": 1.0, "count/a": 1.0, "count/b": 0.0}


def test_counting():
    assert M.count_accuracy("There are 3 apples.", ["3"]) == 1.0
    assert M.count_accuracy("three", ["3"]) == 0.0
    assert M.countbench_accuracy("Three", ["3"]) == 1.0
    assert M.count_exact("3.", ["3"]) == 0.0


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    "fn",
    [M.relaxed_accuracy, M.anls, M.vqa_accuracy, M.ai2d_accuracy, M.ocrbench_score, M.count_exact,
     M.count_accuracy, M.countbench_accuracy, M.exact_match],
)  # fmt: skip
@pytest.mark.parametrize(
    "garbage", ["", "\x00\x01", "💥" * 50, "<think>", "nan", "-inf", "%" * 10, "a" * 5000, None]
)
def test_garbage_scores_zero_and_never_raises(fn, garbage):
    assert fn(garbage, ["42"]) == 0.0


@pytest.mark.parametrize(
    "fn", [M.relaxed_accuracy, M.anls, M.vqa_accuracy, M.ocrbench_score, M.count_accuracy]
)
def test_empty_gold_list_is_an_error(fn):
    with pytest.raises(ValueError, match="empty"):
        fn("x", [])


def test_levenshtein_matches_a_brute_force_definition():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("abc "), size=rng.integers(0, 7)))
        b = "".join(rng.choice(list("abc "), size=rng.integers(0, 7)))
        # naive recursive definition, memoized
        memo: dict = {}

        def d(i, j, a=a, b=b, memo=memo):
            if (i, j) not in memo:
                if i == 0 or j == 0:
                    memo[i, j] = i + j
                else:
                    memo[i, j] = min(
                        d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1])
                    )
            return memo[i, j]

        assert M.levenshtein(a, b) == d(len(a), len(b))


# ----------------------------------------------------------------------------- answer extraction


def test_answer_extraction():
    assert after_answer("Let me look. Answer: 42") == "42"
    assert after_answer("42") == "42"
    assert most_common_line("7\n8\n7\n") == "7"
    assert clean_response("<think>hm</think> Answer: 5", molmo=True) == "5"
    assert clean_response("<think>hm</think> Answer: 5") == "Answer: 5"
    assert (
        chartqa.score("Answer: 12", Record(id="1", question="", answers=["12"]), True)["relaxed_overall"]
        == 1.0
    )


# ----------------------------------------------------------------------------- pointing


def test_pointing_masks_hungarian():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 0:5, 0:5] = True
    masks[1, 0:5, 3:10] = True  # overlaps mask 0 at x in 3..4
    # point a lies in both masks, b only in mask 0: greedy (a->0) would leave b unmatched
    pred = np.array([[4.0, 1.0], [1.0, 1.0]])
    out = M.pointing_scores_masks(pred, masks)
    assert out["n_match"] == 2 and out["precision"] == 1.0 and out["recall"] == 1.0 and out["f1"] == 1.0
    # two points in one mask count once
    out = M.pointing_scores_masks(np.array([[1.0, 1.0], [2.0, 2.0]]), masks[:1])
    assert out["precision"] == 0.5 and out["recall"] == 1.0 and out["f1"] == pytest.approx(2 / 3)
    # outside the image and NaN never match, never crash
    out = M.pointing_scores_masks(np.array([[-1.0, 3.0], [50.0, 50.0], [np.nan, 1.0]]), masks)
    assert out["n_match"] == 0 and out["f1"] == 0.0


def test_pointing_empty_cases():
    none = np.zeros((0, 2))
    assert M.pointing_scores_distance(none, none, 1.0)["f1"] == 1.0  # "There are none." and right
    assert M.pointing_scores_distance(np.array([[1.0, 1.0]]), none, 1.0)["f1"] == 0.0
    assert M.pointing_scores_distance(none, np.array([[1.0, 1.0]]), 1.0)["recall"] == 0.0
    assert M.pointing_scores_masks(none, np.zeros((0, 4, 4), bool))["f1"] == 1.0


def test_pointing_distance_threshold():
    gold = np.array([[10.0, 10.0], [50.0, 50.0]])
    out = M.pointing_scores_distance(np.array([[12.0, 10.0], [80.0, 80.0]]), gold, threshold=3.0)
    assert out["precision"] == 0.5 and out["recall"] == 0.5
    out = M.pointing_scores_distance(np.array([[12.0, 10.0]]), gold, threshold=1.0)
    assert out["n_match"] == 0
