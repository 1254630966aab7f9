"""Pointing answers as text, in Molmo's format.

One point:   ``<point x="12.3" y="45.6" alt="mug">mug</point>``
Several:     ``<points x1="10.0" y1="20.0" x2="30.5" y2="40.0" alt="mug">mug</points>``
None:        ``There are none.``

Coordinates are percentages (0-100) of the image width and height with one decimal, and
points are sorted left to right (then top to bottom). A parsed coordinate outside 0-100 or not
finite lies off the image: it is not a point, and ``read_points`` counts it as dropped.
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


def _on_image(x: float, y: float) -> bool:
    return math.isfinite(x) and math.isfinite(y) and 0.0 <= x <= 100.0 and 0.0 <= y <= 100.0


def parse_points(text: str, width: int, height: int) -> list[tuple[float, float]]:
    """Read points from model output as pixel coordinates; never raises on any text.

    Understands ``<point>``/``<points>`` tags (percent coordinates), ``Click(x, y)`` and bare
    ``(x, y)`` pairs. Coordinates outside 0-100 or non-finite are not points and are dropped
    (``read_points`` also says how many); bare pairs outside 0-100 are ignored the same way.
    """
    return read_points(text, width, height)[0]


def read_points(text: str, width: int, height: int) -> tuple[list[tuple[float, float]], int]:
    """``(points in pixels, number of tagged coordinates dropped as off the image)`` for ``text``."""
    if not isinstance(text, str):
        return [], 0
    out: list[tuple[float, float]] = []
    dropped = 0

    def _to_pixels(x: float, y: float, width: int, height: int, scale: float) -> tuple[float, float] | None:
        nonlocal dropped
        if not _on_image(x, y):
            dropped += 1
            return None
        return x / scale * width, y / scale * height

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
        if out or dropped:
            return out, dropped
        tagless = _POINT_RE.sub("", _POINTS_RE.sub("", text))
        for regex in (_CLICK_RE, _PAIR_RE):
            for m in regex.finditer(tagless):
                x, y = float(m.group(1)), float(m.group(2))
                if _on_image(x, y):  # bare pairs off the image are prose, not dropped points
                    out.append((x / 100.0 * width, y / 100.0 * height))
            if out:
                return out, dropped
    except (ValueError, OverflowError, RecursionError):
        return out, dropped
    return out, dropped
