"""Scenes of coloured shapes with known masks, for counting, pointing and colour questions.

Objects never overlap, so each object's mask is its whole drawn area and points chosen deep
inside a mask (the pixel farthest from the mask's edge) stay inside after rounding to one
decimal of a percent. Questions:

- ``point``: "Point to all the red circles." -> ``render_points`` text (``There are none.`` if absent)
- ``count``: "How many red circles are there?" -> ``"3"`` (``"0"`` if absent)
- ``color``: "What color is the star?" (the only star) -> ``"red"``
- ``shape``: "What shape is the blue object?" (the only blue one) -> ``"star"``

The defaults are rich (up to 12 objects, 12 shapes and icons, 11 colours, textured backgrounds). Two easy
configurations that a tiny random-init model learns in minutes (for the demo) are
``EASY_COUNT`` ("How many shapes are there?" -> "1".."4": 1-4 red circles of nearly one size on
a plain background, so the count is proportional to the coloured area), ``EASY_POINT`` ("Point
to all the shapes." on the same circles, each centred in its own cell of a 3 x 3 grid, so a point
is one of nine places) and ``EASY_COLOR`` ("What color is the circle?" -> red / blue / green /
yellow: one large circle)::

    generate("scenes", n, seed, out, **EASY_COUNT)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from data_tools.synth.checks import check_scene
from data_tools.synth.core import Draft, SynthError, register
from mmsmall.processing.points import render_points

# name -> RGB; no white (backgrounds are light)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "blue": (35, 85, 215),
    "green": (35, 155, 60),
    "yellow": (240, 200, 25),
    "purple": (125, 50, 175),
    "orange": (245, 130, 25),
    "black": (25, 25, 25),
    "pink": (240, 115, 185),
    "brown": (125, 80, 40),
    "cyan": (25, 190, 210),
    "gray": (125, 125, 125),
}
SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "diamond",
    "hexagon",
    "cross",
    "ring",
    "heart",
    "arrow",
    "house",
    "moon",
)
QUESTION_TYPES = ("point", "count", "color", "shape")
QUERIES = ("any", "all", "shape", "color", "color_shape")
BACKGROUNDS = ("plain", "gradient", "noise", "mixed")
_PLURAL = {"cross": "crosses"}

EASY_COUNT = dict(  # task "counting"; blind baseline ~25-30% (most frequent count)
    image_size=112, min_objects=1, max_objects=4, n_shapes=1, n_colors=1, min_object_size=0.22,
    max_object_size=0.26, question_types=["count"], query="all", background="plain",
)  # fmt: skip
EASY_POINT = dict(  # task "pointing": "Point to all the shapes." on 1-4 circles, each centred in its
    **{**EASY_COUNT, "question_types": ["point"]}, grid=3,  # own cell of a 3 x 3 grid
)  # fmt: skip
EASY_COLOR = dict(  # task "vqa"; blind baseline ~25%
    image_size=112, min_objects=1, max_objects=1, n_shapes=1, n_colors=4, min_object_size=0.3,
    max_object_size=0.5, question_types=["color"], background="plain",
)  # fmt: skip


def plural(shape: str) -> str:
    return _PLURAL.get(shape, shape + "s")


@dataclass
class SceneOptions:
    image_size: int = 0  # square side in pixels; 0 = random in [256, 512]
    min_objects: int = 1
    max_objects: int = 12
    min_object_size: float = 0.07  # object diameter as a fraction of the image side
    max_object_size: float = 0.2
    n_colors: int = len(COLORS)  # use the first n colours of COLORS
    n_shapes: int = len(SHAPES)  # use the first n shapes of SHAPES
    question_types: list[str] = field(default_factory=lambda: ["point", "count", "color", "shape"])
    query: str = "any"  # what a point/count question filters by: any|all|shape|color|color_shape
    absent_rate: float = 0.15  # share of point/count questions about a kind that is not there
    background: str = "mixed"  # plain|gradient|noise|mixed
    grid: int = 0  # 0: objects anywhere; k: each centred in its own cell of a k x k grid
    color_jitter: int = 12  # +- per RGB channel, so colour names cover a small range
    ext: str = "png"

    def validate(self) -> None:
        def bad(msg: str) -> SynthError:
            return SynthError(f"synth scenes: {msg}")

        if self.image_size and not 32 <= self.image_size <= 4096:
            raise bad(f"image_size={self.image_size} must be 0 (random) or in [32, 4096]")
        if not 0 <= self.min_objects <= self.max_objects <= 40:
            raise bad(
                f"need 0 <= min_objects <= max_objects <= 40, got {self.min_objects}, {self.max_objects}"
            )
        if not 0.02 <= self.min_object_size <= self.max_object_size <= 0.6:
            raise bad("need 0.02 <= min_object_size <= max_object_size <= 0.6")
        if not 1 <= self.n_colors <= len(COLORS):
            raise bad(f"n_colors must be in [1, {len(COLORS)}]")
        if not 1 <= self.n_shapes <= len(SHAPES):
            raise bad(f"n_shapes must be in [1, {len(SHAPES)}]")
        unknown = sorted(set(self.question_types) - set(QUESTION_TYPES)) or (
            [] if self.question_types else ["(empty)"]
        )
        if unknown:
            raise bad(f"question_types {unknown} not valid; choose from {', '.join(QUESTION_TYPES)}")
        if self.query not in QUERIES:
            raise bad(f"query={self.query!r}; valid: {', '.join(QUERIES)}")
        if self.grid and not (2 <= self.grid <= 8 and self.max_objects <= self.grid**2):
            raise bad(f"grid={self.grid} must be 0 or in [2, 8] with max_objects <= grid**2 cells")
        if self.grid and self.max_object_size >= 1 / self.grid:
            raise bad(f"grid={self.grid}: max_object_size must be below 1/grid so objects fit their cells")
        if self.background not in BACKGROUNDS:
            raise bad(f"background={self.background!r}; valid: {', '.join(BACKGROUNDS)}")
        if self.ext not in ("png", "jpg"):
            raise bad(f"ext={self.ext!r}; valid: png, jpg")
        self.question_types = list(self.question_types)


def shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``r`` (pixels) rotated by ``rot`` radians."""

    def ring(k: int, radius: float, phase: float) -> np.ndarray:
        a = rot + phase + np.arange(k) * 2 * np.pi / k
        return np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], axis=1)

    if shape == "square":
        pts = ring(4, r, np.pi / 4)
    elif shape == "diamond":
        a = rot + np.arange(4) * np.pi / 2
        rad = np.array([r, 0.62 * r, r, 0.62 * r])
        pts = np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], axis=1)
    elif shape == "triangle":
        pts = ring(3, r, -np.pi / 2)
    elif shape == "hexagon":
        pts = ring(6, r, 0.0)
    elif shape == "star":
        outer, inner = ring(5, r, -np.pi / 2), ring(5, 0.45 * r, -np.pi / 2 + np.pi / 5)
        pts = np.stack([outer, inner], axis=1).reshape(10, 2)
    elif shape == "cross":
        w = 0.36 * r
        base = np.array(
            [
                (-w, -r),
                (w, -r),
                (w, -w),
                (r, -w),
                (r, w),
                (w, w),
                (w, r),
                (-w, r),
                (-w, w),
                (-r, w),
                (-r, -w),
                (-w, -w),
            ]
        )
        c, s = math.cos(rot), math.sin(rot)
        pts = base @ np.array([[c, s], [-s, c]]) + [cx, cy]
    elif shape in ("arrow", "house"):
        if shape == "arrow":  # pointing along +x before rotation
            base = np.array([(-r, -0.3 * r), (0.2 * r, -0.3 * r), (0.2 * r, -0.75 * r), (r, 0.0),
                             (0.2 * r, 0.75 * r), (0.2 * r, 0.3 * r), (-r, 0.3 * r)])  # fmt: skip
        else:  # upright: walls and a roof
            base = np.array([(-0.7 * r, r), (-0.7 * r, -0.1 * r), (-0.95 * r, -0.1 * r), (0.0, -r),
                             (0.95 * r, -0.1 * r), (0.7 * r, -0.1 * r), (0.7 * r, r)])  # fmt: skip
            rot = 0.0
        c, s = math.cos(rot), math.sin(rot)
        pts = base @ np.array([[c, s], [-s, c]]) + [cx, cy]
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        scale = r / 17.0
        pts = np.stack([cx + hx * scale, cy + (hy + 2.5) * scale], axis=1)
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [(float(x), float(y)) for x, y in pts]


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill, bg=None
) -> None:
    """Draw one shape; used for both the picture (``fill`` = colour) and its mask (``fill`` = 1)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ri = 0.5 * r
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
    elif shape == "moon":  # a disc with an offset disc cut out, horns turned by ``rot``
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ox, oy = cx + 0.45 * r * math.cos(rot), cy + 0.45 * r * math.sin(rot)
        draw.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=bg)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r, rot), fill=fill)


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """(H, W, 3) uint8 light background."""
    base = rng.integers(205, 256, size=3)
    if kind == "mixed":
        kind = ("plain", "gradient", "noise")[int(rng.integers(3))]
    img = np.broadcast_to(base.astype(np.float32), (size, size, 3)).copy()
    if kind == "gradient":
        other = rng.integers(205, 256, size=3).astype(np.float32)
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        t = t[:, None] if rng.random() < 0.5 else t[None, :]
        img = img * (1 - t[..., None]) + other * t[..., None]
    elif kind == "noise":
        img += rng.normal(0.0, 6.0, size=(size, size, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _place(
    rng: np.random.Generator, n: int, size: int, opts: SceneOptions
) -> list[tuple[float, float, float]]:
    """Up to ``n`` non-overlapping (cx, cy, r) in pixels, by rejection sampling (or, with
    ``opts.grid``, centred in ``n`` distinct cells of the grid)."""
    if opts.grid:
        cell = size / opts.grid
        cells = rng.choice(opts.grid**2, size=n, replace=False)
        return [
            ((c % opts.grid + 0.5) * cell, (c // opts.grid + 0.5) * cell,
             0.5 * size * rng.uniform(opts.min_object_size, opts.max_object_size))
            for c in cells.tolist()
        ]  # fmt: skip
    placed: list[tuple[float, float, float]] = []
    gap = max(2.0, 0.015 * size)
    for _ in range(60 * max(n, 1)):
        if len(placed) == n:
            break
        r = 0.5 * size * rng.uniform(opts.min_object_size, opts.max_object_size)
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        if all(math.hypot(cx - x, cy - y) > r + q + gap for x, y, q in placed):
            placed.append((float(cx), float(cy), float(r)))
    return placed


def _inner_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask pixel farthest from the mask's edge, as pixel-centre (x, y)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.pad(mask[y0:y1, x0:x1], 1)
    dist = ndimage.distance_transform_edt(crop)
    iy, ix = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x0 + ix - 1 + 0.5), float(y0 + iy - 1 + 0.5)


def _query(rng: np.random.Generator, opts: SceneOptions, objects: list[dict], colors, shapes) -> dict:
    """Pick what a point/count question asks about: {"color": str|None, "shape": str|None}."""
    q = opts.query
    if q == "any":
        q = ("all", "shape", "color", "color_shape")[int(rng.choice(4, p=[0.1, 0.35, 0.2, 0.35]))]
    if q == "all":
        return {"color": None, "shape": None}
    want_color, want_shape = q in ("color", "color_shape"), q in ("shape", "color_shape")
    combos = {(o["color"] if want_color else None, o["shape"] if want_shape else None) for o in objects}
    every = {(c if want_color else None, s if want_shape else None) for c in colors for s in shapes}
    absent = sorted(every - combos, key=str)
    present = sorted(combos, key=str)
    if absent and (not present or rng.random() < opts.absent_rate):
        c, s = absent[int(rng.integers(len(absent)))]
    elif present:
        c, s = present[int(rng.integers(len(present)))]
    else:
        return {"color": None, "shape": None}
    return {"color": c, "shape": s}


def _noun(query: dict, count: int | None = None) -> str:
    shape, color = query["shape"], query["color"]
    if shape is None:
        noun = "shapes" if color is None else "objects"
    else:
        noun = plural(shape)
    return f"{color} {noun}" if color else noun


def _label(query: dict) -> str:
    parts = [p for p in (query["color"], query["shape"]) if p]
    return " ".join(parts) if parts else "shape"


@register("scenes", SceneOptions, check_scene, "coloured shapes with masks: pointing, counting, colour/shape")
def make_scene(rng: np.random.Generator, opts: SceneOptions) -> Draft:
    size = opts.image_size or int(rng.integers(256, 513))
    colors = list(COLORS)[: opts.n_colors]
    shapes = list(SHAPES)[: opts.n_shapes]
    n_target = int(rng.integers(opts.min_objects, opts.max_objects + 1))
    bg = _background(rng, size, opts.background)
    placed = _place(rng, n_target, size, opts)

    img = Image.fromarray(bg)
    objects: list[dict] = []
    masks: list[np.ndarray] = []
    for cx, cy, r in placed:
        shape = shapes[int(rng.integers(len(shapes)))]
        color = colors[int(rng.integers(len(colors)))]
        rgb = tuple(
            int(v)
            for v in np.clip(
                np.array(COLORS[color]) + rng.integers(-opts.color_jitter, opts.color_jitter + 1, 3), 0, 255
            )
        )
        rot = float(rng.uniform(0, 2 * np.pi)) if shape not in ("circle", "ring", "heart", "house") else 0.0
        m = Image.new("1", (size, size), 0)
        draw_shape(ImageDraw.Draw(m), shape, cx, cy, r, rot, 1, bg=0)
        img.paste(rgb, (0, 0, size, size), mask=m)  # the picture is exactly the mask, holes included
        mask = np.array(m, dtype=bool)  # (H, W)
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        px, py = _inner_point(mask)
        objects.append(
            {
                "shape": shape,
                "color": color,
                "rgb": list(rgb),
                "center": [round(cx, 2), round(cy, 2)],
                "radius": round(r, 2),
                "rotation": round(rot, 4),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "area": int(mask.sum()),
                "point": [px / size, py / size],
            }
        )
        masks.append(mask)

    qtype = opts.question_types[int(rng.integers(len(opts.question_types)))]
    meta: dict = {"objects": objects, "size": size}
    points: list[dict] = []
    if qtype in ("point", "count"):
        query = _query(rng, opts, objects, colors, shapes)
        hits = [
            o
            for o in objects
            if (query["color"] is None or o["color"] == query["color"])
            and (query["shape"] is None or o["shape"] == query["shape"])
        ]
        xy = [o["point"] for o in hits]
        label = _label(query)
        points = [{"label": label, "xy": [[round(x, 4), round(y, 4)] for x, y in xy]}]
        if qtype == "point":
            task = "pointing"
            if query["color"] is None and query["shape"] is None:
                question = "Point to all the shapes."
            else:
                question = f"Point to all the {_noun(query)}."
            answer = render_points([tuple(p) for p in xy], label)
        else:
            task = "counting"
            question = f"How many {_noun(query)} are there?"
            answer = str(len(hits))
        meta["query"] = {"type": qtype, **query}
    else:
        task = "vqa"
        key, other = ("shape", "color") if qtype == "color" else ("color", "shape")
        counts: dict[str, int] = {}
        for o in objects:
            counts[o[key]] = counts.get(o[key], 0) + 1
        unique = [o for o in objects if counts[o[key]] == 1]
        if not unique:  # nothing identifiable by itself: ask to count everything instead
            question, answer, task = "How many shapes are there?", str(len(objects)), "counting"
            meta["query"] = {"type": "count", "color": None, "shape": None}
        else:
            o = unique[int(rng.integers(len(unique)))]
            if qtype == "color":
                question = f"What color is the {o['shape']}?"
            else:
                question = f"What shape is the {o['color']} object?"
            answer = o[other]
            meta["query"] = {"type": qtype, key: o[key]}
            points = [{"label": o[key], "xy": [[round(o["point"][0], 4), round(o["point"][1], 4)]]}]
    return Draft(
        image=img,
        task=task,
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta=meta,
        points=points,
        aux={"masks": masks},
        ext=opts.ext,
    )
