"""Per-sample scores, equal case by case to lmms-eval 0.7.3's task scoring (written afresh).

Every function takes one model response and the gold answers and returns a float in [0, 1];
none of them raises on any response text (garbage scores 0). An empty gold list is a data
error and raises ``ValueError``. Quirks of the reference implementations that change scores
are kept on purpose, so numbers are comparable with published ones; each is listed in the
function's docstring and pinned by ``tests/test_metrics.py`` against a table computed by
running lmms-eval's own code (``tests/data/metric_reference.json``).

The functions score the response as lmms-eval hands it to the task (already passed through
``strip_reasoning``, see ``eval/answers.py``); responses are not stripped again here unless the
reference does so.
"""

from __future__ import annotations

import re
import statistics
import string
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "relaxed_accuracy",
    "anls",
    "vqa_accuracy",
    "normalize_vqa_answer",
    "option_letter",
    "option_match",
    "ai2d_accuracy",
    "ocrbench_score",
    "count_exact",
    "countbench_accuracy",
    "count_accuracy",
    "exact_match",
    "levenshtein",
    "pointing_scores_masks",
    "pointing_scores_distance",
    "pointing_scores_images",
    "molmo_pointing_scores",
    "molmo_count_scores",
]


def _check_answers(answers: Sequence[str], metric: str) -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    answers = [a if isinstance(a, str) else str(a) for a in answers]
    if not answers:
        raise ValueError(f"{metric}: the gold answer list is empty; every sample needs at least one answer")
    return answers


# ----------------------------------------------------------------------------- ChartQA


def _chart_float(text: str) -> float | None:
    """``float()`` of the text; a trailing ``%`` (any number of them) divides by 100."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: list[str], max_relative_change: float = 0.05) -> float:
    """ChartQA relaxed accuracy: 1.0 if any gold answer is matched, else 0.0.

    Numbers are read with Python's ``float()`` (so ``1,000`` is not a number, ``1_000`` and
    ``1e3`` are, surrounding whitespace is fine), a trailing ``%`` divides by 100. When the gold
    answer parses to a non-zero number and the prediction parses too, the answer is right when
    ``|pred - gold| / |gold| <= 0.05`` (years included: ``2000`` vs ``2014`` is right); otherwise
    (gold zero or not a number, or prediction not a number) it is a case-insensitive exact string
    match. So ``62%`` vs ``62`` is 0, ``0.0`` vs ``0`` is 0 and ``1.05`` vs ``1`` is 0 (float error).
    """
    answers = _check_answers(answers, "relaxed_accuracy")
    if not isinstance(prediction, str):
        return 0.0
    pred_f = _chart_float(prediction)
    for gold in answers:
        gold_f = _chart_float(gold)
        if pred_f is not None and gold_f:  # gold 0.0 and None both fall through to the string match
            if abs(pred_f - gold_f) / abs(gold_f) <= max_relative_change:
                return 1.0
        elif prediction.lower() == gold.lower():
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1), O(len(a) * len(b)) time."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average normalized Levenshtein similarity for one question (DocVQA, InfoVQA).

    Both strings are stripped, lower-cased and have whitespace runs collapsed for the edit
    distance, but the divisor is ``max(len(gold.upper()), len(pred.upper()))`` of the *raw*
    strings (so padding whitespace enlarges it, and ``ß`` counts two). The best gold answer wins;
    a similarity below ``threshold`` becomes 0 while exactly 0.5 is kept. Two empty strings give 1.
    """
    answers = _check_answers(answers, "anls")
    if not isinstance(prediction, str):
        return 0.0
    pred_norm = " ".join(prediction.strip().lower().split())
    best_distance = None
    for gold in answers:
        gold_norm = " ".join(gold.strip().lower().split())
        length = max(len(gold.upper()), len(prediction.upper()))
        d = 0.0 if length == 0 else levenshtein(gold_norm, pred_norm) / length
        best_distance = d if best_distance is None else min(best_distance, d)
    score = 1.0 - best_distance
    return 0.0 if score < threshold else score


# ----------------------------------------------------------------------------- MP-DocVQA (lmms-eval multidocvqa)


def _mp_norm(text: str) -> str:
    return text.lower().strip()  # the MP-DocVQA evaluator's only normalization (no whitespace collapse)


def mp_anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS as MP-DocVQA's evaluator (lmms-eval ``multidocvqa``) computes it, which differs from
    DocVQA's :func:`anls`: both sides are only lower-cased and stripped, the divisor is the longer
    *normalized* string, an empty prediction or the prediction ``none`` scores 0 (even against an
    empty gold), and a best similarity of exactly ``threshold`` is kept."""
    answers = _check_answers(answers, "mp_anls")
    if not isinstance(prediction, str):
        return 0.0
    pred = _mp_norm(prediction)
    if not pred or pred == "none":
        return 0.0
    best = max(1 - levenshtein(_mp_norm(g), pred) / max(len(_mp_norm(g)), len(pred)) for g in answers)
    return best if best >= threshold else 0.0


def mp_accuracy(prediction: str, answers: list[str]) -> float:
    """MP-DocVQA's exact-match accuracy: lower-cased, stripped equality with any gold; ``none`` is 0."""
    answers = _check_answers(answers, "mp_accuracy")
    if not isinstance(prediction, str):
        return 0.0
    pred = _mp_norm(prediction)
    return float(pred != "none" and any(_mp_norm(g) == pred for g in answers))


# ----------------------------------------------------------------------------- TextVQA (EvalAI)

_CONTRACTIONS = {
    # (no apostrophe) -> (with apostrophe), as the VQA/EvalAI answer processor maps them
    **{w: w[:-1] + "'" + w[-1] for w in "arent didnt doesnt dont hadnt hasnt isnt wasnt werent wont mustnt".split()},
    **{w: w[:-2] + "'" + w[-2:] for w in "theyre youre whatre whyre".split()},
    "aint": "ain't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "havent": "haven't", "hed": "he'd", "hed've": "he'd've",
    "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic: the reference table maps this one backwards
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyve": "they've", "twas": "'twas",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "whatll": "what'll",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whys": "why's", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                         "0 0 1 2 3 4 5 6 7 8 9 10".split()))  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_VQA_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_LIMIT = 32  # the reference passes re.UNICODE (== 32) as sub()'s *count* argument


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI / VQA answer normalization, quirks included.

    Lower-case; drop ``,`` and ``?``; ``'s`` -> `` 's``; newlines/tabs to spaces; strip. Each
    punctuation mark in a fixed list (not ``.`` ``'`` ``:`` ``%``) is deleted when it touches a
    space anywhere in the text, else replaced by a space. Periods not followed by a digit are
    removed (only the first 32). Number words zero..ten -> digits, articles dropped, missing
    apostrophes of contractions restored.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    squeeze = _DIGIT_COMMA_DIGIT.search(text) is not None  # never true after the comma removal above
    out = text
    for p in _VQA_PUNCT:
        touches_space = (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if touches_space or squeeze else " ")
    out = _PERIOD.sub("", out, count=_PERIOD_LIMIT)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """TextVQA accuracy with the EvalAI normalization on the prediction and every gold answer.

    For each gold answer i: ``min(1, (#other gold answers equal to the prediction) / 3)``; the
    score is the mean over i. So three matching answers out of ten give 0.9, four or more give 1,
    and a single gold answer always scores 0 (nothing left over to match), as in the reference.
    """
    answers = _check_answers(answers, "vqa_accuracy")
    if not isinstance(prediction, str):
        return 0.0
    pred = normalize_vqa_answer(prediction)
    golds = [normalize_vqa_answer(a) for a in answers]
    n_match = sum(g == pred for g in golds)
    per_gold = [min(1.0, (n_match - (g == pred)) / 3) for g in golds]
    return float(statistics.mean(per_gold))


# ----------------------------------------------------------------------------- AI2D

_OPTION_LETTER = re.compile(r"^\s*([A-Z])\.")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def option_letter(response: str) -> str:
    """The option letter when the response starts with ``X.`` (after whitespace), else the text."""
    m = _OPTION_LETTER.match(response)
    return m.group(1) if m else response


def option_match(prediction: str, answers: list[str]) -> float:
    """Exact match ignoring case and ASCII punctuation (lmms-eval ``exact_match`` as AI2D sets it)."""
    answers = _check_answers(answers, "option_match")
    if not isinstance(prediction, str):
        return 0.0
    pred = prediction.lower().translate(_PUNCT_TABLE)
    return float(any(pred == a.lower().translate(_PUNCT_TABLE) for a in answers))


def ai2d_accuracy(prediction: str, answers: list[str]) -> float:
    """AI2D: take the letter of a leading ``X.``, else the whole text; then ``option_match``.

    ``(B)``, ``**B**``, ``b``, ``B:`` and ``B. dog`` score 1; ``The answer is B`` and ``B dog``
    score 0. In the full pipeline the letter is taken from the raw response *before* reasoning
    tags are stripped (``eval/answers.py`` and the AI2D task do it in that order).
    """
    if not isinstance(prediction, str):
        return 0.0
    return option_match(option_letter(prediction).strip(), answers)


# ----------------------------------------------------------------------------- OCRBench


def _fold_fullwidth(text: str) -> str:
    """Full-width ASCII (U+FF01..U+FF5E) to ASCII, ideographic space to a space; nothing else."""
    return "".join(
        chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else (" " if c == "\u3000" else c) for c in text
    )


def ocrbench_score(prediction: str, answers: list[str], dataset: str = "") -> float:
    """OCRBench: 1 if some gold answer is a substring of the prediction.

    Normally both sides are full-width folded, lower-cased, stripped and have newlines turned into
    spaces (so ``10`` counts for gold ``1``). For ``dataset == "HME100k"`` (handwritten math) both
    are compared with every space and newline removed, case-sensitively. An empty gold matches.
    """
    answers = _check_answers(answers, "ocrbench_score")
    if not isinstance(prediction, str):
        return 0.0
    pred = prediction.strip()
    if dataset == "HME100k":
        pred_n = pred.strip().replace("\n", " ").replace(" ", "")
        return float(any(a.strip().replace("\n", " ").replace(" ", "") in pred_n for a in answers))
    pred_n = _fold_fullwidth(pred).lower().strip().replace("\n", " ")
    return float(any(_fold_fullwidth(a).lower().strip().replace("\n", " ") in pred_n for a in answers))


# ----------------------------------------------------------------------------- counting

_INT = re.compile(r"\d+")


def count_exact(prediction: str, answers: list[str]) -> float:
    """CountBenchQA (lmms-eval ``countbenchqa``): stripped prediction equals ``str(number)``."""
    answers = _check_answers(answers, "count_exact")
    if not isinstance(prediction, str):
        return 0.0
    return float(any(prediction.strip() == a for a in answers))


_COUNT_WORDS = dict(
    zip(
        "none zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split(),
        [str(i) for i in (0, *range(21))],
    )
)


def countbench_accuracy(prediction: str, answers: list[str]) -> float:
    """CountBench (lmms-eval ``countbench``): stripped, lower-cased, number words up to twenty
    turned into digits, then exact equality (``three`` is right for 3, ``3 dogs`` is not)."""
    answers = _check_answers(answers, "countbench_accuracy")
    if not isinstance(prediction, str):
        return 0.0

    def norm(x: str) -> str:
        x = x.strip().lower()
        return _COUNT_WORDS.get(x, x)

    return float(any(norm(prediction) == norm(a) for a in answers))


def count_accuracy(prediction: str, answers: list[str]) -> float:
    """PixMo-Count (lmms-eval ``pixmo_count``): first digit run of the prediction vs of the gold.

    Digit runs are compared as strings (``03`` is not ``3``); a prediction without digits is
    compared whole (so number words score 0).
    """
    answers = _check_answers(answers, "count_accuracy")
    if not isinstance(prediction, str):
        return 0.0
    pred = prediction.strip()
    m = _INT.search(pred)
    pred_num = m.group() if m else pred
    for gold in answers:
        gold = gold.strip()
        g = _INT.search(gold)
        if pred_num == (g.group() if g else gold):
            return 1.0
    return 0.0


def exact_match(prediction: str, answers: list[str]) -> float:
    """Stripped, case-insensitive, whitespace-collapsed equality (our synthetic sets, e.g. clocks)."""
    answers = _check_answers(answers, "exact_match")
    if not isinstance(prediction, str):
        return 0.0
    pred = " ".join(prediction.lower().split())
    return float(any(pred == " ".join(a.lower().split()) for a in answers))


# ----------------------------------------------------------------------------- pointing


def _prf(n_match: int, n_pred: int, n_gold: int) -> dict[str, float]:
    """Precision, recall, F1; an empty side is perfect only when the other side is empty too."""
    precision = n_match / n_pred if n_pred else float(n_gold == 0)
    recall = n_match / n_gold if n_gold else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n_match": float(n_match)}


def _max_matching(hits: np.ndarray) -> int:
    """Largest one-to-one matching in a boolean (n_pred, n_gold) hit matrix (Hungarian)."""
    if hits.size == 0 or not hits.any():
        return 0
    rows, cols = linear_sum_assignment(hits.astype(np.float64), maximize=True)
    return int(hits[rows, cols].sum())


def pointing_scores_masks(pred_xy: np.ndarray | Sequence, masks: np.ndarray | Sequence) -> dict[str, float]:
    """Points-in-masks precision / recall / F1 with a one-to-one (Hungarian) matching.

    pred_xy: (P, 2) predicted points in pixels (x, y). masks: (G, H, W) boolean, one per gold
    object. A prediction can match a gold object when it lies inside its mask; each prediction and
    each object is used at most once, and the matching maximizes the number of pairs.
    """
    pred = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)  # (P, 2)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.size == 0:
        masks = masks.reshape(0, *(masks.shape[1:] if masks.ndim == 3 else (1, 1)))
    n_gold, h, w = masks.shape
    finite = np.isfinite(pred).all(axis=1)  # (P,)
    safe = np.where(finite[:, None], pred, -1.0)
    xi = np.floor(safe[:, 0]).astype(np.int64)  # (P,)
    yi = np.floor(safe[:, 1]).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h) & finite
    hits = np.zeros((len(pred), n_gold), dtype=bool)  # (P, G)
    if inside.any() and n_gold:
        hits[inside] = masks[:, yi[inside], xi[inside]].T
    return _prf(_max_matching(hits), len(pred), n_gold)


def pointing_scores_distance(
    pred_xy: np.ndarray | Sequence, gold_xy: np.ndarray | Sequence, threshold: float
) -> dict[str, float]:
    """Precision / recall / F1 for gold *points* (no masks): a pair matches within ``threshold``.

    pred_xy (P, 2), gold_xy (G, 2) and threshold in the same units (the tasks use pixels with a
    threshold relative to the image diagonal). One-to-one Hungarian matching as for masks.
    """
    pred = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)  # (P, 2)
    gold = np.asarray(gold_xy, dtype=np.float64).reshape(-1, 2)  # (G, 2)
    dist = np.linalg.norm(pred[:, None, :] - gold[None, :, :], axis=-1)  # (P, G)
    hits = np.nan_to_num(dist, nan=np.inf) <= threshold
    return _prf(_max_matching(hits), len(pred), len(gold))


def pointing_scores_images(per_image: Sequence[tuple[int, int, int]]) -> dict[str, float]:
    """Precision / recall / F1 of one answer over several images from each image's
    ``(n_match, n_pred, n_gold)``: a point is matched only against its own image's gold (Molmo2's
    multi-image pointing), and the counts add up across the images. One image: that image's scores."""
    n_match = sum(int(m) for m, _, _ in per_image)
    return _prf(n_match, sum(int(p) for _, p, _ in per_image), sum(int(g) for _, _, g in per_image))


def molmo_pointing_scores(
    pred_xy: np.ndarray | Sequence, gold_xy: np.ndarray | Sequence, masks: np.ndarray, valid_format: bool
) -> dict[str, float]:
    """Molmo's pointing-eval scores of one answer (allenai/molmo ``olmo/eval/evaluators.py``
    ``PointingEval``), pixels throughout.

    No gold point: right (1) only when nothing is predicted. Otherwise an answer whose text is not
    one whole pointing answer (``valid_format``) scores 0; else predictions are paired one-to-one
    with the gold points by least total distance (Hungarian), and a pair counts when the
    prediction, rounded to the nearest pixel, lies inside that object's mask: precision = pairs
    counted / predictions, recall = pairs counted / masks, F1 = 0 when either is 0.
    """
    pred = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)  # (P, 2)
    gold = np.asarray(gold_xy, dtype=np.float64).reshape(-1, 2)  # (G, 2)
    masks = np.asarray(masks, dtype=bool)  # (M, H, W), one per gold object
    if len(gold) == 0:
        v = float(len(pred) == 0)
        return {"precision": v, "recall": v, "f1": v}
    if not valid_format or len(pred) == 0 or len(masks) == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    dist = np.linalg.norm(pred[:, None, :] - gold[None, :, :], axis=-1)  # (P, G)
    rows, cols = linear_sum_assignment(dist)
    h, w = masks.shape[1:]
    hit = 0
    for i, j in zip(rows, cols):
        if j >= len(masks):
            continue
        x, y = int(round(pred[i, 0])), int(round(pred[i, 1]))
        hit += bool(0 <= x < w and 0 <= y < h and masks[j, y, x])
    precision, recall = hit / len(pred), hit / len(masks)
    f1 = 0.0 if precision == 0 or recall == 0 else 2 * precision * recall / (precision + recall + 1e-10)
    return {"precision": precision, "recall": recall, "f1": f1}


def molmo_count_scores(prediction: str, gold: int) -> dict[str, float]:
    """Molmo's point-count scores (allenai/molmo ``olmo/eval/evaluators.py`` ``PointCountEval``):
    the count is the answer's last word (lower-cased, a final ``.`` dropped) as a number or a number
    word up to twenty, else the ``N`` of "a total of N"; ``correct`` (equal), ``close`` (within 1)
    and ``valid`` (a count was read). Molmo's "none" fallback pattern is written with ``\\b`` in a
    plain string (backspace characters), so it never matches; it is left out here the same way."""
    pred = str(prediction).lower().rstrip(".").strip()
    count = None
    parts = pred.split()
    if parts:
        if re.fullmatch(r"[+-]?\d+", parts[-1]):
            count = int(parts[-1])
        else:
            word = _COUNT_WORDS.get(parts[-1]) if parts[-1] != "none" else None  # Molmo's WORD_TO_NUM
            count = int(word) if word is not None else None
    if count is None:
        m = re.match(r".*a total of ([0-9]+).*", pred)
        count = int(m.group(1)) if m else None
    if count is None:
        return {"correct": 0.0, "close": 0.0, "valid": 0.0}
    return {"correct": float(count == gold), "close": float(abs(count - gold) <= 1), "valid": 1.0}
