"""Text filters on a sample's messages; each returns a drop reason code or None.

Reason codes: ``text_empty``, ``text_short``, ``text_long``, ``text_few_words``,
``text_many_words``, ``text_repetitive``, ``text_boilerplate``, ``text_language``.
Language id uses the optional ``langid`` package; without it the check is skipped and the
report says so (:func:`language_id_available`).
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from .config import TextConfig

_WORD = re.compile(r"\w+", re.UNICODE)


@lru_cache(maxsize=1)
def language_id_available() -> bool:
    try:
        import langid  # noqa: F401
    except ImportError:
        return False
    return True


def repetition_ratio(words: list[str], n: int = 3) -> float:
    """Share of the words covered by the most frequent word n-gram (0 for short texts)."""
    if len(words) < 2 * n:
        return 0.0
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    count = grams.most_common(1)[0][1]
    return count * n / len(words) if count > 1 else 0.0


def text_filter(messages: list[dict], cfg: TextConfig) -> tuple[str | None, str]:
    """Check the assistant text (bounds) and all text (repetition, boilerplate, language).

    Returns ``(reason, detail)``; reason None keeps the sample.
    """
    if not cfg.enabled:
        return None, ""
    answer = " ".join(m["content"] for m in messages if m.get("role") == "assistant").strip()
    if not answer:
        return "text_empty", "no assistant text"
    if len(answer) < cfg.min_chars:
        return "text_short", f"{len(answer)} chars < text.min_chars={cfg.min_chars}"
    if len(answer) > cfg.max_chars:
        return "text_long", f"{len(answer)} chars > text.max_chars={cfg.max_chars}"
    words = _WORD.findall(answer.lower())
    if len(words) < cfg.min_words:
        return "text_few_words", f"{len(words)} words < text.min_words={cfg.min_words}"
    if len(words) > cfg.max_words:
        return "text_many_words", f"{len(words)} words > text.max_words={cfg.max_words}"
    rep = repetition_ratio(words)
    if rep > cfg.max_repeat_ratio:
        return (
            "text_repetitive",
            f"top 3-gram covers {rep:.2f} > text.max_repeat_ratio={cfg.max_repeat_ratio}",
        )
    full = " ".join(m["content"] for m in messages).lower()
    for phrase in cfg.boilerplate:
        if phrase.lower() in full:
            return "text_boilerplate", f"contains {phrase!r}"
    if cfg.languages and language_id_available():
        import langid

        lang, _ = langid.classify(answer)
        if lang not in cfg.languages:
            return "text_language", f"detected {lang!r}, not in text.languages"
    return None, ""
