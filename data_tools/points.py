"""Pointing annotations: convert to normalized [0, 1] coordinates and validate.

Accepted raw points: ``[{"x": .., "y": ..}, ...]`` (PixMo-Points) or ``[[x, y], ...]``, in the
input's coordinate space ``normalized`` | ``percent`` (0-100) | ``pixels`` (divided by the
annotation's ``width``/``height`` when given, else by the decoded image's size).
Reason codes: ``point_malformed``, ``point_outside``, ``point_label_empty``. An empty point list
is a negative and is kept as ``points: []`` for that label.
"""

from __future__ import annotations

import math

from mmsmall.processing.points import render_points

_EPS = 1e-6


def _pairs(raw) -> list[tuple[float, float]] | None:
    out = []
    if not isinstance(raw, list):
        return None
    for p in raw:
        if isinstance(p, dict) and "x" in p and "y" in p:
            x, y = p["x"], p["y"]
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            x, y = p
        else:
            return None
        try:
            x, y = float(x), float(y)
        except (TypeError, ValueError):
            return None
        if not (math.isfinite(x) and math.isfinite(y)):
            return None
        out.append((x, y))
    return out


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def normalize_points(
    labels: list[dict], coords: str, width: int, height: int
) -> tuple[list[dict] | None, str | None, str]:
    """``[{"label", "raw", "width", "height"}]`` -> ``([{"label", "xy"}], reason, detail)``."""
    out = []
    for lab in labels:
        if not isinstance(lab.get("label") or "", str):
            return None, "point_malformed", f"label {lab.get('label')!r} is not text"
        label = (lab.get("label") or "").strip()
        if not label:
            return None, "point_label_empty", "a pointing label is empty"
        pairs = _pairs(lab.get("raw"))
        if pairs is None:
            return None, "point_malformed", f"label {label!r}: points are not a list of (x, y)"
        if coords == "pixels":
            w, h = lab.get("width") or width, lab.get("height") or height
            if not all(_positive(v) for v in (w, h)):
                return (
                    None,
                    "point_malformed",
                    f"label {label!r}: width/height {w!r}x{h!r} is not a positive size",
                )
            xy = [(x / w, y / h) for x, y in pairs]
        elif coords == "percent":
            xy = [(x / 100.0, y / 100.0) for x, y in pairs]
        else:
            xy = pairs
        for x, y in xy:
            if not (-_EPS <= x <= 1 + _EPS and -_EPS <= y <= 1 + _EPS):
                return None, "point_outside", f"label {label!r}: point ({x:.3f}, {y:.3f}) outside the image"
        xy = sorted((round(min(max(x, 0.0), 1.0), 6), round(min(max(y, 0.0), 1.0), 6)) for x, y in xy)
        out.append({"label": label, "xy": [list(p) for p in xy]})
    return out, None, ""


def normalize_page_points(
    labels: list[dict], coords: str, sizes: list[tuple[int, int]]
) -> tuple[list[dict] | None, str | None, str]:
    """``normalize_points`` for a sample of ``len(sizes)`` images: each label is on the image its
    ``image`` index names (0 when absent), and with several images its output keeps that index."""
    out = []
    for lab in labels:
        i = lab.get("image", 0)
        if not 0 <= i < len(sizes):
            detail = f"label {lab.get('label')!r}: image index {i}, the sample has {len(sizes)} image(s)"
            return None, "point_malformed", detail
        pts, reason, detail = normalize_points([lab], coords, *sizes[i])
        if reason is not None:
            return None, reason, detail
        out.append(pts[0] | ({"image": i} if len(sizes) > 1 else {}))
    return out, None, ""


def pointing_messages(points: list[dict]) -> list[dict]:
    """One question/answer turn per label, answers in Molmo's pointing text (percent of the image the
    points are on; a label of a several-image sample names its image, 1-based)."""
    msgs = []
    for p in points:
        where = f" in image {p['image'] + 1}" if "image" in p else ""
        msgs.append({"role": "user", "content": f"Point to {p['label']}{where}."})
        msgs.append({"role": "assistant", "content": render_points([tuple(q) for q in p["xy"]], p["label"])})
    return msgs
