"""Independent re-checks of every synthetic answer, run before a sample is written.

Each check reads the data a generator stored (its ``meta``, plus ``aux`` such as object masks
or the boxes of drawn text), re-derives the answer with its own code (never the generator's
answer functions) and compares it with the assistant message. A disagreement raises
``CheckFailed("reason: detail")``; ``generate`` drops the sample and counts the reason.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

import numpy as np

from data_tools.synth.core import CheckFailed, Draft
from mmsmall.processing.points import NO_POINTS, parse_points

UNANSWERABLE = "unanswerable"  # the answer to a question the image cannot answer


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


# ----------------------------------------------------------------------------- clocks

# lit segments -> digit, written independently of clocks.SEGMENTS (as bit masks over a..g)
_SEG_BITS = {0b0111111: 0, 0b0000110: 1, 0b1011011: 2, 0b1001111: 3, 0b1100110: 4,
             0b1101101: 5, 0b1111101: 6, 0b0000111: 7, 0b1111111: 8, 0b1101111: 9}  # fmt: skip


def _clock_angle(center: list[float], tip: list[float]) -> float:
    """Degrees clockwise from 12 o'clock of the hand from ``center`` to ``tip`` (image y down)."""
    return math.degrees(math.atan2(tip[0] - center[0], center[1] - tip[1])) % 360.0


def check_clock(draft: Draft) -> None:
    """Read the time back from the drawn hands (analog) or the drawn segments (digital)."""
    _, answer = _qa(draft)
    m_ans = re.fullmatch(r"(1[0-2]|[1-9]):([0-5]\d)", answer)
    if not m_ans:
        _fail("clock_format", f"answer {answer!r} is not H:MM")
    meta = draft.meta
    if meta["face"] == "analog":
        # a face without a minute hand (clocks.hour_hand_only) shows whole hours: minute 0
        a_min = 0.0 if meta["minute_tip"] is None else _clock_angle(meta["center"], meta["minute_tip"])
        a_hour = _clock_angle(meta["center"], meta["hour_tip"])
        minute = int(math.floor(a_min / 6.0 + 1e-3)) % 60
        # the hour hand sits minute/2 degrees past the hour: remove that and it is a multiple of 30
        base = (a_hour - a_min / 12.0) % 360.0
        hour_f = base / 30.0
        if abs(hour_f - round(hour_f)) > 0.05:
            _fail(
                "clock_hands", f"hour hand at {a_hour:.2f} deg disagrees with minute hand at {a_min:.2f} deg"
            )
        hour = int(round(hour_f)) % 12 or 12
    else:
        digits = []
        for lit in meta["segments"]:
            bits = sum(1 << "abcdefg".index(c) for c in lit)
            if bits == 0:
                continue  # a blank leading digit
            if bits not in _SEG_BITS:
                _fail("clock_segments", f"segments {lit!r} are no digit")
            digits.append(_SEG_BITS[bits])
        shown = "".join(map(str, digits))
        if shown != meta["display"].replace(":", ""):
            _fail("clock_segments", f"segments read {shown} but display is {meta['display']}")
        groups = meta["display"].split(":")
        hh, minute = int(shown[: len(groups[0])]), int(shown[len(groups[0]) : len(groups[0]) + 2])
        if meta["format"] == "12h" and not 1 <= hh <= 12 or not 0 <= hh <= 23:
            _fail("clock_range", f"display {meta['display']} is no valid {meta['format']} time")
        hour = hh % 12 or 12
    if (int(m_ans.group(1)), int(m_ans.group(2))) != (hour, minute):
        _fail("clock_time", f"answer {answer} but the face reads {hour}:{minute:02d}")


# ----------------------------------------------------------------------------- charts


def _num_equal(answer: str, expected: float, decimals: int) -> bool:
    try:
        got = parse_number(answer)
    except ValueError:
        return False
    return abs(got - expected) <= 0.5 * 10.0**-decimals + 1e-9 * max(1.0, abs(expected))


def _need_visible(draft: Draft, names: list[str]) -> None:
    visible = draft.aux.get("visible_text", set())
    missing = [n for n in names if n not in visible]
    if missing:
        _fail("chart_label_hidden", f"{missing} not drawn inside the image")


def check_chart(draft: Draft) -> None:
    """Re-derive the answer from the stored data table with numpy; referenced labels must be visible."""
    question, answer = _qa(draft)
    data, args = draft.meta["data"], draft.meta["question"]
    qt, s = args["qtype"], args["series"]
    series = data["series"]
    if len(series) > 1:
        _need_visible(draft, [series[s]])
    if data["chart_type"] == "scatter":
        pts = [np.asarray(p, dtype=float).reshape(-1, 2) for p in data["points"]]  # per series (k, 2)
        if qt == "count":
            ok = answer == str(pts[s].shape[0])
        elif qt == "max_y":
            ok = _num_equal(answer, float(np.concatenate(pts)[:, 1].max()), data["decimals"])
        elif qt == "extremum":
            tops = np.array([p[:, 1].max() for p in pts])
            ok = (tops == tops.max()).sum() == 1 and answer == series[int(tops.argmax())]
        elif qt == "comparison":
            o = args["other"]
            ok = len(pts[s]) != len(pts[o]) and answer == (
                series[s] if len(pts[s]) > len(pts[o]) else series[o]
            )
        elif qt == "yes_no":
            ok = answer == ("Yes" if (pts[s][:, 1] > args["threshold"]).any() else "No")
        else:
            ok = False
        if not ok:
            _fail("chart_answer", f"scatter {qt}: answer {answer!r} disagrees with the data")
        return
    V = np.asarray(data["values"], dtype=float)  # (n_series, n_categories)
    row, cats, d = V[s], data["categories"], data["decimals"]
    if qt == "lookup":
        _need_visible(draft, [cats[args["cat"]]])
        ok = _num_equal(answer, row[args["cat"]], d)
    elif qt in ("extremum", "multiple_choice"):
        target = row.max() if args["highest"] else row.min()
        winners = np.flatnonzero(row == target)
        ok = len(winners) == 1
        if ok and qt == "extremum":
            ok = answer == cats[int(winners[0])]
            _need_visible(draft, cats)
        elif ok:
            letters = "ABCD"
            opts = args["options"]
            ok = answer in letters[: len(opts)] and opts[letters.index(answer)] == int(winners[0])
            ok = ok and all(f"\n{letters[t]}. {cats[c]}" in question for t, c in enumerate(opts))
            _need_visible(draft, cats)
    elif qt in ("comparison", "yes_no", "difference", "ratio"):
        a, b = row[args["cat"]], row[args["other"]]
        _need_visible(draft, [cats[args["cat"]], cats[args["other"]]])
        if qt == "comparison":
            ok = a != b and answer == cats[args["cat"] if a > b else args["other"]]
        elif qt == "yes_no":
            ok = a != b and answer == ("Yes" if a > b else "No")
        elif qt == "difference":
            ok = _num_equal(answer, abs(a - b), d)
        else:
            ok = b != 0 and _num_equal(answer, a / b, 2)
    elif qt == "count":
        n = len(series) if args.get("what") == "series" else len(cats)
        ok = answer == str(n)
        _need_visible(draft, series if args.get("what") == "series" else cats)
    elif qt == "trend":
        delta = row[-1] - row[0]
        ok = delta != 0 and answer == ("increase" if delta > 0 else "decrease")
        _need_visible(draft, [cats[0], cats[-1]])
    elif qt == "total":
        ok = _num_equal(answer, float(V[:, args["cat"]].sum()), d)
        _need_visible(draft, [cats[args["cat"]]])
    elif qt == "unanswerable":
        absent = args["absent"]
        ok = (
            answer == UNANSWERABLE
            and absent not in cats
            and absent not in draft.aux.get("visible_text", set())
        )
    else:
        ok = False
    if not ok:
        _fail("chart_answer", f"{qt}: answer {answer!r} disagrees with the data")


# ----------------------------------------------------------------------------- tables and documents


def _printed_tolerance(text: str) -> float:
    """Half a unit in the last printed digit of a number such as ``$3.2M`` or ``1,234.50``."""
    core = text.strip().rstrip("%)")
    mult = {"K": 1e3, "M": 1e6, "B": 1e9}.get(core[-1:], 1.0)
    core = core.rstrip("KMB")
    decimals = len(core.split(".")[1]) if "." in core else 0
    return 0.5 * 10.0**-decimals * mult + 1e-9


def _printed_equals(text: str, value: float) -> bool:
    try:
        return abs(parse_number(text) - value) <= _printed_tolerance(text)
    except (ValueError, IndexError):
        return False


def _need_drawn(draft: Draft, texts: list[str], exact: bool = True) -> None:
    """Every text must have been drawn (exactly, or inside a longer run) within the image."""
    w, h = draft.aux["size"]
    runs = [s for s, (x0, y0, x1, y1) in draft.aux["drawn"] if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h]
    for t in texts:
        if not any((s == t) if exact else (t in s) for s in runs):
            _fail("text_not_drawn", f"{t!r} is not drawn inside the {w}x{h} image")


def _not_drawn(draft: Draft, text: str) -> None:
    if any(text in s for s, _ in draft.aux["drawn"]):
        _fail("unanswerable_drawn", f"{text!r} is drawn, so the question is answerable")


def check_table(draft: Draft) -> None:
    """Printed cells must parse back to the data; answers are re-derived from the data with numpy."""
    _, answer = _qa(draft)
    t, args = draft.meta["table"], draft.meta["question"]
    V = np.asarray(t["values"], dtype=float)  # (n_rows, n_cols)
    for i, row in enumerate(t["cells"]):
        for j, cell in enumerate(row):
            if not _printed_equals(cell, V[i, j]):
                _fail("table_cell_format", f"cell {cell!r} does not print {V[i, j]}")
    rows = t["rows"]
    _need_drawn(draft, rows + [c["name"] for c in t["columns"]])
    qt, r, c = args["qtype"], args["row"], args["col"]
    col = V[:, c]
    if qt == "lookup":
        ok = answer == t["cells"][r][c] and _printed_equals(answer, V[r, c])
        _need_drawn(draft, [answer])
    elif qt == "total":
        ok = _printed_equals(answer, float(np.sum(col)))
    elif qt == "extremum":
        best = np.flatnonzero(col == (col.max() if args["highest"] else col.min()))
        ok = len(best) == 1 and answer == rows[int(best[0])]
    elif qt == "difference":
        ok = _printed_equals(answer, abs(col[r] - col[args["other"]]))
    elif qt == "count_above":
        ok = answer == str(int(np.count_nonzero(col > args["threshold"])))
    elif qt == "n_rows":
        ok = answer == str(len(rows))
    elif qt == "group":
        spans = t["row_groups"]["spans"]
        owner = [s["label"] for s in spans if s["start"] <= r < s["start"] + s["span"]]
        ok = len(owner) == 1 and answer == owner[0]
        _need_drawn(draft, [answer])
    elif qt == "unanswerable":
        ok = answer == UNANSWERABLE and args["absent"] not in rows
        _not_drawn(draft, args["absent"])
    else:
        ok = False
    if not ok:
        _fail("table_answer", f"{qt}: answer {answer!r} disagrees with the table")


def _dec(text: str) -> Decimal:
    return Decimal(re.sub(r"[^0-9.\-]", "", text))


def _money_truth(meta: dict) -> dict[str, Decimal]:
    """Subtotal, tax and total recomputed from ``meta["items"]``; the printed money block must agree."""
    sub = sum((Decimal(it["unit"]) * it["qty"] for it in meta["items"]), Decimal(0))
    tax = (sub * Decimal(meta["money"]["tax_rate"]) / Decimal(100)).quantize(
        Decimal("0.01"), rounding="ROUND_HALF_UP"
    )
    truth = {"subtotal": sub, "tax": tax, "total": sub + tax}
    for key, val in truth.items():
        if Decimal(meta["money"][key]) != val:
            _fail("doc_money", f"printed {key} {meta['money'][key]} but items give {val}")
    return truth


def check_invoice_pages(draft: Draft) -> None:
    """A multi-page invoice: the total recomputed from every page's items, each item and "Page i of n"
    drawn on its page, and the total's page found as the one page where "Total due" was drawn."""
    _, answer = _qa(draft)
    meta, pages = draft.meta, draft.aux["pages"]
    if draft.images is None or not len(draft.images) == len(pages) == meta["n_pages"] >= 2:
        _fail("pages", f"{meta['n_pages']} pages declared, {len(pages)} drawn")
    total = _money_truth(meta)["total"]
    runs = []
    for page in pages:  # the text runs drawn inside each page
        w, h = page["size"]
        runs.append(
            [s for s, (x0, y0, x1, y1) in page["drawn"] if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h]
        )
    for k, r in enumerate(runs):
        if f"Page {k + 1} of {len(pages)}" not in r:
            _fail("text_not_drawn", f"page {k + 1} has no 'Page {k + 1} of {len(pages)}'")
    for it in meta["items"]:
        if it["name"] not in runs[it["page"]]:
            _fail("text_not_drawn", f"item {it['name']!r} is not drawn on page {it['page'] + 1}")
    where = [k for k, r in enumerate(runs) if "Total due" in r]
    printed = f"{meta['currency']}{total:,.2f}"
    if len(where) != 1 or printed not in runs[where[0]]:
        _fail("doc_total_page", f"'Total due' drawn on pages {[k + 1 for k in where]}, {printed} beside it")
    qt = meta["question"]["qtype"]
    ok = answer == str(where[0] + 1) if qt == "total_page" else qt == "total" and answer == printed
    if not ok:
        _fail(
            "doc_answer",
            f"invoice_pages {qt}: answer {answer!r}; the pages give {printed} on page {where[0] + 1}",
        )


def check_doc(draft: Draft) -> None:
    """Recompute money from the line items with Decimal; field answers must be drawn as printed."""
    _, answer = _qa(draft)
    meta, args = draft.meta, draft.meta["question"]
    qt, doc = args["qtype"], meta["doc_type"]
    if doc in ("receipt", "invoice"):
        items = meta["items"]
        amounts = [Decimal(it["unit"]) * it["qty"] for it in items]
        truth = _money_truth(meta)
        _need_drawn(draft, [it["name"] for it in items])
        if qt in truth:
            ok = _dec(answer) == truth[qt] and answer.startswith(meta["currency"])
            _need_drawn(draft, [answer])
        elif qt == "item_amount":
            ok = _dec(answer) == amounts[args["item"]]
            _need_drawn(draft, [answer])
        elif qt == "unit_price":
            ok = _dec(answer) == Decimal(items[args["item"]]["unit"])
            _need_drawn(draft, [answer], exact=False)
        elif qt == "n_items":
            ok = answer == str(len(items))
        elif qt == "field":
            ok = answer == meta["fields"][args["key"]]
            _need_drawn(draft, [answer], exact=False)
        else:
            ok = False
    elif doc == "form":
        if qt == "checked":
            ok = len(args["marks"]) == 1 and answer == args["marks"][0] == meta["checked"]
        else:
            ok = answer == meta["fields"][args["key"]]
        _need_drawn(draft, [answer])
    elif doc == "report":
        if qt == "figure":
            ok = _dec(answer) == meta["figures"][args["metric"]][args["quarter"]]
            _need_drawn(draft, [answer], exact=False)
        elif qt == "best_quarter":
            vals = np.asarray(meta["figures"][args["metric"]])
            best = np.flatnonzero(vals == vals.max())
            ok = len(best) == 1 and answer == meta["quarters"][int(best[0])]
            _need_drawn(draft, [answer])
        elif qt == "field":
            ok = answer == meta["fields"][args["key"]]
            _need_drawn(draft, [answer], exact=False)
        else:
            ok = False
    else:
        ok = False
    if not ok:
        _fail("doc_answer", f"{doc} {qt}: answer {answer!r} disagrees with the document data")
