"""From a raw model response to the text a metric scores.

lmms-eval 0.7.3 (command-line default) removes ``<think>...</think>`` and
``<analysis>...</analysis>`` blocks and strips the response; Molmo's evaluation additionally
keeps only the text after ``Answer:`` and, for some tasks, votes for the most common line.
"""

from __future__ import annotations

from collections import Counter

REASONING_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def strip_reasoning(text: str, tags: tuple[tuple[str, str], ...] = REASONING_TAGS) -> str:
    """Remove reasoning blocks and strip, exactly as lmms-eval's command-line default does.

    Tags are case-sensitive. Each complete ``start ... end`` block is cut (from the first start
    tag to the first end tag after it). An unclosed start tag is left alone. When an end tag
    remains without any start tag (a template that pre-fills ``<think>``), only the text after
    the last end tag is kept.
    """
    if not isinstance(text, str):
        return ""
    out = text
    for start_tag, end_tag in tags:
        while start_tag in out and end_tag in out:
            i = out.find(start_tag)
            j = out.find(end_tag, i)
            if j == -1:
                break
            out = out[:i] + out[j + len(end_tag) :]
        if end_tag in out and start_tag not in out:
            out = out.rsplit(end_tag, 1)[-1]
    return out.strip()


def after_answer(text: str) -> str:
    """Molmo: keep the text after the last ``Answer:`` when there is one."""
    if "Answer:" in text:
        text = text.rsplit("Answer:", 1)[-1]
    return text.strip()


def most_common_line(text: str) -> str:
    """Molmo's vote for repetitive outputs: the most frequent non-empty line (first wins ties)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return text.strip()
    return Counter(lines).most_common(1)[0][0]


def clean_response(text: str, *, molmo: bool = False, vote: bool = False) -> str:
    """Reasoning blocks removed and stripped; with ``molmo`` also the ``Answer:`` suffix rule
    (and with ``vote`` the most-common-line rule, applied first)."""
    text = strip_reasoning(text)
    if vote:
        text = most_common_line(text)
    if molmo:
        text = after_answer(text)
    return text
