"""Independent re-checks of every synthetic answer, run before a sample is written.

Each check reads the data a generator stored (its ``meta``, plus ``aux`` such as object masks
or the boxes of drawn text), re-derives the answer with its own code (never the generator's
answer functions) and compares it with the assistant message. A disagreement raises
``CheckFailed("reason: detail")``; ``generate`` drops the sample and counts the reason.
"""

from __future__ import annotations

import math

import numpy as np

from data_tools.synth.core import CheckFailed, Draft
from mmsmall.processing.points import NO_POINTS, parse_points


def _qa(draft: Draft) -> tuple[str, str]:
    msgs = draft.messages
    if len(msgs) != 2 or msgs[0]["role"] != "user" or msgs[1]["role"] != "assistant":
        raise CheckFailed("format: expected one user turn and one assistant turn")
    if not msgs[1]["content"].strip():
        raise CheckFailed("format: empty answer")
    return msgs[0]["content"], msgs[1]["content"]


def _fail(reason: str, detail: str) -> None:
    raise CheckFailed(f"{reason}: {detail}")


def parse_number(text: str) -> float:
    """A number as printed in charts/tables/documents: ``$1,234.5``, ``(12)``, ``45%``, ``-3.2M``."""
    t = text.strip()
    neg = t.startswith("(") and t.endswith(")")
    t = (
        t.strip("()")
        .replace(",", "")
        .replace("$", "")
        .replace("€", "")
        .replace("£", "")
        .replace("%", "")
        .strip()
    )
    mult = 1.0
    for suffix, m in (("K", 1e3), ("M", 1e6), ("B", 1e9)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
    value = float(t) * mult
    return -value if neg else value


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


# ----------------------------------------------------------------------------- scenes


def check_scene(draft: Draft) -> None:
    """Recount matching objects from their masks; every point must fall in one matching mask."""
    question, answer = _qa(draft)
    objects, masks = draft.meta["objects"], draft.aux["masks"]
    if len(objects) != len(masks):
        _fail("scene_meta", f"{len(objects)} objects but {len(masks)} masks")
    img = np.asarray(draft.image.convert("RGB"))  # (H, W, 3)
    h, w = img.shape[:2]
    if masks:
        stack = np.stack(masks)  # (N, H, W)
        if (stack.sum(0) > 1).any():
            _fail("scene_overlap", "two object masks overlap")
        for o, m in zip(objects, masks):
            if not m.any():
                _fail("scene_empty_mask", f"{o['color']} {o['shape']} has an empty mask")
            if not (img[m] == np.array(o["rgb"], dtype=np.uint8)).all():
                _fail("scene_pixels", f"{o['color']} {o['shape']} is not drawn where its mask is")
    q = draft.meta["query"]

    def matches(o: dict) -> bool:
        return all(q.get(k) is None or o[k] == q[k] for k in ("color", "shape"))

    hit_masks = [m for o, m in zip(objects, masks) if matches(o) and m.any()]
    if q["type"] == "count":
        if not answer.isdigit() or int(answer) != len(hit_masks):
            _fail("scene_count", f"answer {answer!r} but {len(hit_masks)} matching masks")
    elif q["type"] == "point":
        if not hit_masks:
            if answer != NO_POINTS:
                _fail("scene_point_absent", f"nothing matches but answer is {answer!r}")
        pts = parse_points(answer, w, h)
        if len(pts) != len(hit_masks):
            _fail("scene_point_count", f"{len(pts)} points for {len(hit_masks)} matching objects")
        claimed = np.zeros(len(hit_masks), dtype=int)
        for x, y in pts:
            ix, iy = min(int(x), w - 1), min(int(y), h - 1)
            inside = [i for i, m in enumerate(hit_masks) if m[iy, ix]]
            if len(inside) != 1:
                _fail("scene_point_outside", f"point ({x:.1f}, {y:.1f}) is in no matching mask")
            claimed[inside[0]] += 1
        if (claimed != 1).any():
            _fail("scene_point_dup", "a matching object got no point or two points")
    elif q["type"] in ("color", "shape"):
        key = "shape" if q["type"] == "color" else "color"
        other = "color" if key == "shape" else "shape"
        same = [o for o in objects if o[key] == q[key]]
        if len(same) != 1:
            _fail("scene_not_unique", f"{len(same)} objects have {key} {q[key]!r}")
        if answer != same[0][other]:
            _fail("scene_attr", f"answer {answer!r} but the {q[key]} is {same[0][other]!r}")
    else:
        _fail("scene_query", f"unknown question type {q['type']!r}")
    # every stored point lies inside a mask of an object with that label
    for entry in draft.points:
        for x, y in entry["xy"]:
            ix, iy = min(int(x * w), w - 1), min(int(y * h), h - 1)
            if not any(m[iy, ix] for m in masks):
                _fail("scene_point_outside", f"stored point ({x:.3f}, {y:.3f}) is in no mask")
