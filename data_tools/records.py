"""Shape checks for the annotation fields of a raw record, whatever JSON value a user put there.

Every reader passes a record's user-given fields through these before anything else touches
them, so a malformed value becomes the drop reason ``bad_annotation`` and never an exception.
Each function returns the cleaned value, or None when the value has the wrong shape.
"""

from __future__ import annotations

from typing import Any

CAPTION_PROMPT = "Describe this image."  # the user turn of a captioning sample
SCALARS = (str, int, float)  # answers and captions may be numbers ("42"); bools and containers may not


def scalar_text(value: Any) -> str | None:
    """A caption, question or answer as text; None for a list, dict, bool or null."""
    if isinstance(value, bool) or not isinstance(value, SCALARS):
        return None
    return str(value)


def clean_messages(value: Any) -> list[dict] | None:
    """``[{"role": str, "content": str}, ...]`` with every turn a dict of two strings, else None."""
    if not isinstance(value, list):
        return None
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        out.append({"role": role, "content": content})
    return out


def clean_points(value: Any) -> list[dict] | None:
    """Shard-json points ``[{"label": str, "xy": list, "image"?: int}, ...]`` as raw labels for
    ``normalize_page_points`` (``image``: the index of the image they are on, 0 when absent)."""
    if not isinstance(value, list):
        return None
    out = []
    for p in value:
        if not isinstance(p, dict) or not isinstance(p.get("label", ""), str):
            return None
        image = p.get("image", 0)
        if isinstance(image, bool) or not isinstance(image, int) or image < 0:
            return None
        out.append(
            {
                "label": p.get("label", ""),
                "raw": p.get("xy", []),
                "width": None,
                "height": None,
                "image": image,
            }
        )
    return out


def clean_id(value: Any) -> str | None:
    """A sample id, source or task name: a string or a number, never a container or a bool."""
    return scalar_text(value)
