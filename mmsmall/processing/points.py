"""Pointing answers as text, in Molmo's format.

One point:   ``<point x="12.3" y="45.6" alt="mug">mug</point>``
Several:     ``<points x1="10.0" y1="20.0" x2="30.5" y2="40.0" alt="mug">mug</points>``
None:        ``There are none.``

Coordinates are percentages (0-100) of the image width and height with one decimal, and
points are sorted left to right (then top to bottom).
"""

from __future__ import annotations

import html
import math
import re

NO_POINTS = "There are none."

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_POINT_RE = re.compile(rf'<point\s+x\s*=\s*"({_NUM})"\s+y\s*=\s*"({_NUM})"[^>]*>', re.IGNORECASE)
_POINTS_RE = re.compile(r"<points\s+([^>]*)>", re.IGNORECASE)
_ATTR_RE = re.compile(rf'([xy])(\d+)\s*=\s*"({_NUM})"', re.IGNORECASE)
_CLICK_RE = re.compile(rf"Click\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_PAIR_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")


def _pct(v: float) -> str:
    return f"{min(max(v, 0.0), 1.0) * 100:.1f}"


def render_points(points: list[tuple[float, float]], label: str) -> str:
    """Render points normalized to [0, 1] as Molmo pointing text (``There are none.`` if empty)."""
    if not points:
        return NO_POINTS
    for p in points:
        if len(p) != 2 or not all(math.isfinite(float(c)) for c in p):
            raise ValueError(f"render_points: expected (x, y) pairs of finite floats in [0, 1], got {p!r}")
    ordered = sorted((float(x), float(y)) for x, y in points)
    alt = html.escape(label, quote=True)
    text = html.escape(label, quote=False)
    if len(ordered) == 1:
        x, y = ordered[0]
        return f'<point x="{_pct(x)}" y="{_pct(y)}" alt="{alt}">{text}</point>'
    attrs = " ".join(f'x{i}="{_pct(x)}" y{i}="{_pct(y)}"' for i, (x, y) in enumerate(ordered, start=1))
    return f'<points {attrs} alt="{alt}">{text}</points>'


def _to_pixels(x: float, y: float, width: int, height: int, scale: float) -> tuple[float, float] | None:
    if not (math.isfinite(x) and math.isfinite(y)):
        return None
    return x / scale * width, y / scale * height


def parse_points(text: str, width: int, height: int) -> list[tuple[float, float]]:
    """Read points from model output as pixel coordinates; never raises on any text.

    Understands ``<point>``/``<points>`` tags (percent coordinates), ``Click(x, y)`` and bare
    ``(x, y)`` pairs. Bare pairs are read as percentages when both are within 0-100, else
    ignored (they are too ambiguous to be pixels of an unknown image).
    """
    if not isinstance(text, str):
        return []
    out: list[tuple[float, float]] = []
    try:
        for m in _POINT_RE.finditer(text):
            p = _to_pixels(float(m.group(1)), float(m.group(2)), width, height, 100.0)
            if p is not None:
                out.append(p)
        for m in _POINTS_RE.finditer(text):
            coords: dict[int, dict[str, float]] = {}
            for a in _ATTR_RE.finditer(m.group(1)):
                coords.setdefault(int(a.group(2)), {})[a.group(1).lower()] = float(a.group(3))
            for idx in sorted(coords):
                c = coords[idx]
                if "x" in c and "y" in c:
                    p = _to_pixels(c["x"], c["y"], width, height, 100.0)
                    if p is not None:
                        out.append(p)
        if out:
            return out
        tagless = _POINT_RE.sub("", _POINTS_RE.sub("", text))
        for regex in (_CLICK_RE, _PAIR_RE):
            for m in regex.finditer(tagless):
                x, y = float(m.group(1)), float(m.group(2))
                if 0.0 <= x <= 100.0 and 0.0 <= y <= 100.0:
                    p = _to_pixels(x, y, width, height, 100.0)
                    if p is not None:
                        out.append(p)
            if out:
                return out
    except (ValueError, OverflowError, RecursionError):
        return out
    return out
