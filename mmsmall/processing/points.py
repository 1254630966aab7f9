"""Pointing answers as text, in Molmo's (``molmo``) or Molmo2's (``molmo2``) format.

Molmo (percent of the image width and height, one decimal)::

    <point x="12.3" y="45.6" alt="mug">mug</point>
    <points x1="10.0" y1="20.0" x2="30.5" y2="40.0" alt="mug">mug</points>

Molmo2 (allenai/molmo2 ``olmo/preprocessing/point_formatter.py``, ``UnifiedPointFormatter``,
format "html-v1"): per mille of the image width and height (0-1000, written with at least three
digits), in triplets ``point-id x y`` after the 1-based image index; the images of a multi-image
answer are separated by a tab, and point ids run on across images::

    <points coords="1 1 523 412 2 100 200">mug</points>
    <points coords="1 1 523 412\t3 2 100 200">mug</points>      (image 1 and image 3)

Either way no point is ``There are none.``, and points are sorted left to right (then top to
bottom). Reading follows Molmo2's own eval: Molmo2's ``coords`` text first, Molmo's tags as the
fallback (then ``Click(x, y)`` and bare ``(x, y)`` percent pairs). A coordinate off the image
(over 100 percent / 1000 per mille, not finite), a ``coords`` triplet that is not three numbers
and an image index with no such image are not points: ``read_points`` counts them as dropped.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field

NO_POINTS = "There are none."
POINT_FORMATS = ("molmo", "molmo2")

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_POINT_RE = re.compile(rf'<point\s+x\s*=\s*"({_NUM})"\s+y\s*=\s*"({_NUM})"[^>]*>', re.IGNORECASE)
_POINTS_RE = re.compile(r"<points\s+([^>]*)>", re.IGNORECASE)
_ATTR_RE = re.compile(rf'([xy])(\d+)\s*=\s*"({_NUM})"', re.IGNORECASE)
_CLICK_RE = re.compile(rf"Click\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_PAIR_RE = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
# Molmo2: the coords attribute of a <points> (or <tracks>) tag; images split on Molmo2's separators
_COORDS_RE = re.compile(r'<(?:points|tracks)\b[^>]*?\bcoords\s*=\s*"([^"]*)"', re.IGNORECASE)
_IMAGE_SEP_RE = re.compile(r"[\t:;,]")
_PERMILLE_RE = re.compile(r"\d{3,4}")
# whole Molmo elements (tag, label, closing tag), for rewriting them in Molmo2's text
_POINT_EL_RE = re.compile(
    rf'<point\s+x\s*=\s*"({_NUM})"\s+y\s*=\s*"({_NUM})"[^>]*>(.*?)</point>', re.I | re.S
)
_POINTS_EL_RE = re.compile(r"<points\s+([^>]*)>(.*?)</points>", re.I | re.S)


def check_point_format(point_format: str) -> None:
    if point_format not in POINT_FORMATS:
        raise ValueError(f"point format {point_format!r}; valid: {', '.join(POINT_FORMATS)}")


def _check_pairs(points, where: str) -> list[tuple[float, float]]:
    for p in points:
        if len(p) != 2 or not all(math.isfinite(float(c)) for c in p):
            raise ValueError(f"{where}: expected (x, y) pairs of finite floats in [0, 1], got {p!r}")
    return [(float(x), float(y)) for x, y in points]


def _pct(v: float) -> str:
    return f"{min(max(v, 0.0), 1.0) * 100:.1f}"


def _permille(v: float) -> int:
    return round(1000 * min(max(v, 0.0), 1.0))


def _molmo2_image(points: list[tuple[float, float]], first_id: int) -> str:
    """``id x y`` triplets of one image, sorted after rounding (as Molmo2 does, so ties sort by
    the written values), ids counting from ``first_id``."""
    scaled = sorted((_permille(x), _permille(y)) for x, y in points)
    return " ".join(f"{i} {x:03d} {y:03d}" for i, (x, y) in enumerate(scaled, start=first_id))


def render_points(points: list[tuple[float, float]], label: str, point_format: str = "molmo") -> str:
    """Render points normalized to [0, 1] on one image as pointing text in ``point_format``
    (``molmo`` or ``molmo2``; ``There are none.`` if empty)."""
    check_point_format(point_format)
    if not points:
        return NO_POINTS
    pairs = _check_pairs(points, "render_points")
    text = html.escape(label, quote=False)
    if point_format == "molmo2":
        return f'<points coords="1 {_molmo2_image(pairs, 1)}">{text}</points>'
    ordered = sorted(pairs)
    alt = html.escape(label, quote=True)
    if len(ordered) == 1:
        x, y = ordered[0]
        return f'<point x="{_pct(x)}" y="{_pct(y)}" alt="{alt}">{text}</point>'
    attrs = " ".join(f'x{i}="{_pct(x)}" y{i}="{_pct(y)}"' for i, (x, y) in enumerate(ordered, start=1))
    return f'<points {attrs} alt="{alt}">{text}</points>'


def render_multi_image_points(per_image: list[list[tuple[float, float]]], label: str) -> str:
    """Molmo2's text for points on several images (``per_image[i]``: image i+1's points in
    [0, 1]); images without points are left out, point ids run on across images. Molmo's own
    format has no image index, so there is no ``molmo`` form of this."""
    groups, next_id = [], 1
    for i, points in enumerate(per_image, start=1):
        pairs = _check_pairs(points, f"render_multi_image_points, image {i}")
        if pairs:
            groups.append(f"{i} {_molmo2_image(pairs, next_id)}")
            next_id += len(pairs)
    if not groups:
        return NO_POINTS
    return f'<points coords="{chr(9).join(groups)}">{html.escape(label, quote=False)}</points>'


def to_point_format(text: str, point_format: str) -> str:
    """``text`` with each Molmo pointing element rewritten in ``point_format``: for ``molmo2``
    every ``<point ...>label</point>`` / ``<points x1=...>label</points>`` becomes Molmo2's
    ``<points coords=...>label</points>`` (same points, same label); ``molmo`` leaves the text as
    it is. An element with a coordinate off the image is left unchanged."""
    check_point_format(point_format)
    if point_format == "molmo" or "<point" not in text:
        return text

    def one(m: re.Match) -> str:
        x, y = float(m.group(1)), float(m.group(2))
        if not _on_image(x, y):
            return m.group(0)
        return render_points([(x / 100, y / 100)], html.unescape(m.group(3)), "molmo2")

    def several(m: re.Match) -> str:
        attrs = m.group(1)
        if re.search(r"\bcoords\s*=", attrs, re.IGNORECASE):  # already Molmo2's
            return m.group(0)
        coords: dict[int, dict[str, float]] = {}
        for a in _ATTR_RE.finditer(attrs):
            coords.setdefault(int(a.group(2)), {})[a.group(1).lower()] = float(a.group(3))
        pairs = [(c.get("x", math.nan), c.get("y", math.nan)) for _, c in sorted(coords.items())]
        if not pairs or not all(_on_image(x, y) for x, y in pairs):
            return m.group(0)
        return render_points([(x / 100, y / 100) for x, y in pairs], html.unescape(m.group(2)), "molmo2")

    return _POINTS_EL_RE.sub(several, _POINT_EL_RE.sub(one, text))


def _on_image(x: float, y: float) -> bool:
    return math.isfinite(x) and math.isfinite(y) and 0.0 <= x <= 100.0 and 0.0 <= y <= 100.0


@dataclass
class PointsRead:
    """What one answer points at: ``per_image[i]`` the points on image i+1 in its pixels,
    ``dropped`` the coordinates that are not points (see the module docstring) and ``format`` the
    text they were read from (``molmo2``, ``molmo``, or None when the answer holds no pointing text)."""

    per_image: list[list[tuple[float, float]]] = field(default_factory=list)
    dropped: int = 0
    format: str | None = None

    @property
    def points(self) -> list[tuple[float, float]]:
        return [p for image in self.per_image for p in image]


def parse_points(text: str, width: int, height: int) -> list[tuple[float, float]]:
    """Read points from model output as pixel coordinates; never raises on any text.

    Understands Molmo2's ``coords`` text, Molmo's ``<point>``/``<points>`` tags (percent
    coordinates), ``Click(x, y)`` and bare ``(x, y)`` pairs. Coordinates off the image are not
    points and are dropped (``read_points`` also says how many).
    """
    return read_points(text, width, height)[0]


def read_points(text: str, width: int, height: int) -> tuple[list[tuple[float, float]], int]:
    """``(points in pixels, number of coordinates dropped as not points)`` for one image."""
    got = read_point_text(text, [(width, height)])
    return got.points, got.dropped


def read_point_text(text: str, sizes: list[tuple[int, int]]) -> PointsRead:
    """The points of ``text`` on images of ``sizes`` (``[(width, height), ...]``, in the order the
    question gave them); never raises. With one image every ``coords`` group lands on it whatever
    its index (as Molmo2's single-image eval reads it); with several, the 1-based index picks the
    image and an index with no image drops its points. Molmo's tags have no image index: they
    land on the first image."""
    out = PointsRead(per_image=[[] for _ in sizes])
    if not isinstance(text, str) or not sizes:
        return out
    try:
        _read_molmo2(text, sizes, out)
        if out.points or out.dropped:
            out.format = "molmo2"
            return out
        out.per_image[0], out.dropped = _read_molmo(text, *sizes[0])
        if out.per_image[0] or out.dropped:
            out.format = "molmo"
    except (ValueError, OverflowError, RecursionError):  # keep what was read
        pass
    return out


def _read_molmo2(text: str, sizes: list[tuple[int, int]], out: PointsRead) -> None:
    for coords in _COORDS_RE.finditer(text):
        for group in _IMAGE_SEP_RE.split(coords.group(1)):
            tokens = group.split()
            if not tokens:
                continue
            index, rest = tokens[0], tokens[1:]
            if len(sizes) == 1:
                image = 0 if re.fullmatch(r"\d+(?:\.\d+)?", index) else None
            else:
                image = int(index) - 1 if index.isdigit() and 1 <= int(index) <= len(sizes) else None
            triplets, leftover = _triplets(rest)
            if image is None:  # no such image: none of its points is a point
                out.dropped += len(triplets) + leftover
                continue
            out.dropped += leftover
            w, h = sizes[image]
            for x, y in triplets:
                if x <= 1000 and y <= 1000:
                    out.per_image[image].append((x / 1000 * w, y / 1000 * h))
                else:
                    out.dropped += 1


def _triplets(tokens: list[str]) -> tuple[list[tuple[int, int]], int]:
    """``(x, y)`` per mille of the well-formed ``id x y`` triplets in ``tokens`` (read in order,
    resyncing after a bad token as Molmo2's regex does) and how many malformed triplets the rest
    makes (rounded up)."""
    found, bad, i = [], 0, 0
    while i < len(tokens):
        t = tokens[i : i + 3]
        if len(t) == 3 and t[0].isdigit() and all(_PERMILLE_RE.fullmatch(v) for v in t[1:]):
            found.append((int(t[1]), int(t[2])))
            i += 3
        else:
            bad += 1
            i += 1
    return found, -(-bad // 3)


def _read_molmo(text: str, width: int, height: int) -> tuple[list[tuple[float, float]], int]:
    out: list[tuple[float, float]] = []
    dropped = 0

    def add(x: float, y: float) -> None:
        nonlocal dropped
        if _on_image(x, y):
            out.append((x / 100.0 * width, y / 100.0 * height))
        else:
            dropped += 1

    for m in _POINT_RE.finditer(text):
        add(float(m.group(1)), float(m.group(2)))
    for m in _POINTS_RE.finditer(text):
        coords: dict[int, dict[str, float]] = {}
        for a in _ATTR_RE.finditer(m.group(1)):
            coords.setdefault(int(a.group(2)), {})[a.group(1).lower()] = float(a.group(3))
        for idx in sorted(coords):
            c = coords[idx]
            if "x" in c and "y" in c:
                add(c["x"], c["y"])
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
    return out, dropped
