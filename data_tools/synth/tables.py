"""Data tables rendered with PIL: headers, merged cells, mixed number formats.

A table has a label column (rows such as countries or products), numeric columns each with
its own number format (``1234``, ``1,234``, ``$1,234.50``, ``12.5%``, ``3.14``, ``(1,234)``
for negatives, ``$3.2M``), sometimes a merged group header over several columns (two header
rows) and sometimes a merged group column whose cells span several rows. Styles vary font,
size, header colours, zebra stripes and rules.

Questions: cell lookup (answer as printed), column total, row with the highest/lowest value,
difference, how many rows exceed a value, which group a row belongs to (merged cells), how many
rows, and unanswerable (a row that is not in the table -> ``unanswerable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_tools.synth import fonts
from data_tools.synth.checks import UNANSWERABLE, check_table
from data_tools.synth.core import Draft, SynthError, register
from data_tools.synth.layout import TextCanvas

ROW_POOLS = {
    "country": ("Argentina", "Australia", "Austria", "Belgium", "Chile", "Denmark", "Estonia", "Finland", "Greece",
                "Hungary", "Ireland", "Latvia", "Morocco", "Portugal", "Romania", "Slovenia", "Tunisia", "Uruguay"),
    "product": ("Desk lamp", "Office chair", "Monitor arm", "Keyboard", "Headset", "Webcam", "Docking station",
                "Notebook", "Whiteboard", "Label printer", "Shredder", "Router"),
    "store": ("Store 101", "Store 102", "Store 205", "Store 310", "Store 344", "Store 402", "Store 518", "Store 620"),
    "project": ("Apollo", "Borealis", "Cascade", "Delta", "Ember", "Falcon", "Granite", "Harbor", "Ion", "Juniper"),
}  # fmt: skip
GROUPS = {
    "country": ("region", ("Europe", "Americas", "Africa", "Oceania")),
    "product": ("category", ("Furniture", "Electronics", "Supplies")),
    "store": ("district", ("North", "Central", "South")),
    "project": ("division", ("Infrastructure", "Research", "Services")),
}
MEASURES = (  # name, allowed formats, scale, can be negative
    ("Revenue", ("thousands", "currency", "millions"), 5e5, False),
    ("Units sold", ("int", "thousands"), 5e3, False),
    ("Growth", ("percent",), 30.0, True),
    ("Profit", ("paren", "currency"), 2e5, True),
    ("Score", ("decimal",), 10.0, False),
    ("Staff", ("int",), 400.0, False),
    ("Margin", ("percent",), 40.0, False),
    ("Cost", ("thousands", "currency"), 3e5, False),
)
ADDITIVE = ("int", "thousands", "currency", "paren", "millions")
DECIMALS = {"int": 0, "thousands": 0, "currency": 2, "percent": 1, "decimal": 2, "paren": 0, "millions": -5}


def format_value(v: float, kind: str) -> str:
    if kind == "int":
        return f"{v:.0f}"
    if kind == "thousands":
        return f"{v:,.0f}"
    if kind == "currency":
        return f"-${-v:,.2f}" if v < 0 else f"${v:,.2f}"
    if kind == "percent":
        return f"{v:.1f}%"
    if kind == "decimal":
        return f"{v:.2f}"
    if kind == "paren":
        return f"({-v:,.0f})" if v < 0 else f"{v:,.0f}"
    if kind == "millions":
        return f"${v / 1e6:.1f}M"
    raise ValueError(f"unknown number format {kind!r}")


@dataclass
class TableOptions:
    max_rows: int = 10
    max_cols: int = 5
    ext: str = "png"

    def validate(self) -> None:
        if not 3 <= self.max_rows <= 40 or not 2 <= self.max_cols <= 10:
            raise SynthError("synth tables: need 3 <= max_rows <= 40 and 2 <= max_cols <= 10")
        if self.ext not in ("png", "jpg"):
            raise SynthError(f"synth tables: ext={self.ext!r}; valid: png, jpg")


def _rnd(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _make_table(rng: np.random.Generator, opts: TableOptions) -> dict:
    kind = _rnd(rng, tuple(ROW_POOLS))
    pool = ROW_POOLS[kind]
    n_rows = int(rng.integers(3, min(opts.max_rows, len(pool)) + 1))
    rows = [pool[i] for i in sorted(rng.choice(len(pool), size=n_rows, replace=False))]
    header_style = "years" if rng.random() < 0.4 else "measures"
    columns: list[dict] = []
    if header_style == "years":  # one measure over years, optionally grouped by half
        name, fmts, scale, neg = _rnd(rng, MEASURES)
        fmt = _rnd(rng, fmts)
        n_cols = int(rng.integers(2, opts.max_cols + 1))
        start = int(rng.integers(2012, 2021))
        for c in range(n_cols):
            columns.append(
                {"name": str(start + c), "measure": name, "format": fmt, "scale": scale, "neg": neg}
            )
        group_header = None
        title = f"{name} by {kind} and year"
    else:
        n_cols = int(rng.integers(2, min(opts.max_cols, len(MEASURES)) + 1))
        picks = rng.choice(len(MEASURES), size=n_cols, replace=False)
        for p in picks:
            name, fmts, scale, neg = MEASURES[int(p)]
            columns.append(
                {"name": name, "measure": name, "format": _rnd(rng, fmts), "scale": scale, "neg": neg}
            )
        group_header = None
        title = f"{kind.capitalize()} summary"
    if n_cols >= 4 and rng.random() < 0.5:  # merged group header over the two halves
        half = n_cols // 2
        a, b = _rnd(rng, (("Domestic", "International"), ("First half", "Second half"), ("Actual", "Plan")))
        group_header = [
            {"label": a, "start": 0, "span": half},
            {"label": b, "start": half, "span": n_cols - half},
        ]
    values = np.zeros((n_rows, n_cols))
    for c, col in enumerate(columns):
        d = DECIMALS[col["format"]]
        lo = -0.4 if col["neg"] else 0.02
        v = col["scale"] * rng.uniform(lo, 1.0, size=n_rows)
        values[:, c] = np.round(v, d)
        values[values[:, c] == 0, c] = 10.0**-d
    row_groups = None
    if rng.random() < 0.4 and n_rows >= 4:
        gname, labels = GROUPS[kind]
        k = int(rng.integers(2, min(len(labels), n_rows // 2) + 1))
        cuts = sorted(int(x) for x in rng.choice(np.arange(1, n_rows), size=k - 1, replace=False))
        bounds = [0, *cuts, n_rows]
        row_groups = {
            "name": gname,
            "spans": [
                {"label": labels[g], "start": bounds[g], "span": bounds[g + 1] - bounds[g]} for g in range(k)
            ],
        }
    return {
        "title": title,
        "row_kind": kind,
        "rows": rows,
        "columns": [{"name": c["name"], "measure": c["measure"], "format": c["format"]} for c in columns],
        "values": values.tolist(),  # (n_rows, n_cols)
        "cells": [[format_value(v, columns[c]["format"]) for c, v in enumerate(r)] for r in values],
        "group_header": group_header,
        "row_groups": row_groups,
    }


def _col_ref(t: dict, c: int) -> str:
    """How a question names column ``c`` (with its group header if any, and its measure for years)."""
    col = t["columns"][c]
    name = col["name"]
    if col["name"] != col["measure"]:
        name = f"{col['measure']} in {col['name']}"
    if t["group_header"]:
        g = next(g for g in t["group_header"] if g["start"] <= c < g["start"] + g["span"])
        name = f"{name} ({g['label']})"
    return name


def _question(rng: np.random.Generator, t: dict) -> tuple[str, str, dict]:
    rows, cols, V = t["rows"], t["columns"], np.asarray(t["values"])
    noun = t["row_kind"]
    types = ["lookup", "lookup", "total", "extremum", "difference", "count_above", "n_rows", "unanswerable"]
    if t["row_groups"]:
        types += ["group", "group"]
    qtype = _rnd(rng, types)
    r, c = int(rng.integers(len(rows))), int(rng.integers(len(cols)))
    args: dict = {"qtype": qtype, "row": r, "col": c}
    ref = _col_ref(t, c)
    fmt = cols[c]["format"]
    if qtype == "lookup":
        return f"What is the {ref} of {rows[r]}?", t["cells"][r][c], args
    if qtype == "total":
        if fmt not in ADDITIVE:
            return _question(rng, t)
        return (
            f"What is the total {ref} over all {noun}s in the table?",
            format_value(float(V[:, c].sum()), fmt),
            args,
        )
    if qtype == "extremum":
        highest = bool(rng.random() < 0.5)
        col = V[:, c]
        target = col.max() if highest else col.min()
        if (col == target).sum() != 1:
            return _question(rng, t)
        args["highest"] = highest
        word = "highest" if highest else "lowest"
        return f"Which {noun} has the {word} {ref}?", rows[int(np.flatnonzero(col == target)[0])], args
    if qtype == "difference":
        o = int((r + 1 + rng.integers(len(rows) - 1)) % len(rows))
        args["other"] = o
        diff = abs(V[r, c] - V[o, c])
        shown = format_value(diff, fmt if fmt != "paren" else "thousands")
        return f"What is the difference in {ref} between {rows[r]} and {rows[o]}?", shown, args
    if qtype == "count_above":
        thr_row = int(rng.integers(len(rows)))
        thr = V[thr_row, c]
        args["threshold"] = float(thr)
        shown = t["cells"][thr_row][c]
        return f"How many {noun}s have a {ref} greater than {shown}?", str(int((V[:, c] > thr).sum())), args
    if qtype == "n_rows":
        return f"How many {noun}s are listed in the table?", str(len(rows)), args
    if qtype == "group":
        gname = t["row_groups"]["name"]
        g = next(s for s in t["row_groups"]["spans"] if s["start"] <= r < s["start"] + s["span"])
        return f"Which {gname} does {rows[r]} belong to?", g["label"], args
    absent = [x for x in ROW_POOLS[t["row_kind"]] if x not in rows]
    if not absent:
        return _question(rng, t)
    name = _rnd(rng, absent)
    args["absent"] = name
    return f"What is the {ref} of {name}?", UNANSWERABLE, args


def _render(rng: np.random.Generator, t: dict) -> tuple[TextCanvas, dict]:
    family = _rnd(rng, ("sans", "serif", "mono"))
    size = int(rng.integers(13, 20))
    regular = fonts.pick(rng, family)
    bold = fonts.pick(rng, family + "_bold")
    f, fb = fonts.truetype(regular, size), fonts.truetype(bold, size)
    ft = fonts.truetype(bold, int(size * 1.3))
    header_bg = _rnd(
        rng, ((230, 230, 230), (40, 70, 120), (200, 220, 240), (60, 60, 60), (245, 235, 200), (255, 255, 255))
    )
    header_fg = (255, 255, 255) if sum(header_bg) < 400 else (0, 0, 0)
    zebra = rng.random() < 0.5
    rules = _rnd(rng, ("all", "horizontal", "outer"))
    pad_x, pad_y = int(size * 0.7), int(size * 0.45)
    row_h = size + 2 * pad_y
    has_groups = t["row_groups"] is not None
    first_cols = [t["row_groups"]["name"].capitalize()] if has_groups else []
    headers = first_cols + [t["row_kind"].capitalize()] + [c["name"] for c in t["columns"]]
    body = [
        ([""] if has_groups else []) + [r] + cells for r, cells in zip(t["rows"], t["cells"])
    ]  # group cells drawn merged below
    if has_groups:
        for s in t["row_groups"]["spans"]:
            body[s["start"]][0] = s["label"]
    n_c = len(headers)
    widths = [
        max(fb.getlength(headers[j]), *(f.getlength(b[j]) for b in body)) + 2 * pad_x for j in range(n_c)
    ]
    n_lead = n_c - len(t["columns"])  # label columns before the numeric ones
    margin = int(rng.integers(12, 40))
    table_w = int(sum(widths))
    header_rows = 2 if t["group_header"] else 1
    title_h = int(size * 2.2)
    W = table_w + 2 * margin
    H = margin * 2 + title_h + row_h * (header_rows + len(body)) + int(size * 1.6)
    bg = (255, 255, 255) if rng.random() < 0.7 else tuple(int(v) for v in rng.integers(240, 256, 3))
    cv = TextCanvas(W, H, bg)
    d = cv.draw
    x0, y = margin, margin
    cv.text((x0, y), t["title"], ft, fill=(20, 20, 20))
    y += title_h
    xs = [x0 + sum(widths[:j]) for j in range(n_c + 1)]  # column edges
    line = (120, 120, 120)
    d.rectangle([x0, y, x0 + table_w, y + row_h * header_rows], fill=header_bg)
    if t["group_header"]:
        for g in t["group_header"]:
            a, b = xs[n_lead + g["start"]], xs[n_lead + g["start"] + g["span"]]
            cv.text(((a + b) / 2, y + row_h / 2), g["label"], fb, fill=header_fg, anchor="mm")
            d.line([a + 4, y + row_h - 2, b - 4, y + row_h - 2], fill=header_fg, width=1)
        y += row_h
    for j, h in enumerate(headers):
        if j < n_lead:
            cv.text((xs[j] + pad_x, y + row_h / 2), h, fb, fill=header_fg, anchor="lm")
        else:
            cv.text((xs[j + 1] - pad_x, y + row_h / 2), h, fb, fill=header_fg, anchor="rm")
    y += row_h
    top_body = y
    for i, cells in enumerate(body):
        if zebra and i % 2 == 1:
            d.rectangle([xs[1 if has_groups else 0], y, x0 + table_w, y + row_h], fill=(238, 242, 247))
        for j, s in enumerate(cells):
            if has_groups and j == 0:
                continue
            if j < n_lead:
                cv.text((xs[j] + pad_x, y + row_h / 2), s, f, anchor="lm")
            else:
                cv.text((xs[j + 1] - pad_x, y + row_h / 2), s, f, anchor="rm")
        if rules in ("all", "horizontal"):
            d.line([xs[1 if has_groups else 0], y + row_h, x0 + table_w, y + row_h], fill=line, width=1)
        y += row_h
    if has_groups:  # merged group cells: one label centred over its rows
        for s in t["row_groups"]["spans"]:
            ya, yb = top_body + s["start"] * row_h, top_body + (s["start"] + s["span"]) * row_h
            cv.text((xs[0] + pad_x, (ya + yb) / 2), s["label"], fb, anchor="lm")
            d.line([xs[0], yb, xs[1], yb], fill=line, width=1)
    if rules == "all":  # vertical rules; a merged group header is crossed only at its own edges
        edges = {n_lead + g["start"] for g in t["group_header"] or []} | {0, n_lead}
        for j, xe in enumerate(xs):
            y_top = top_body - row_h * (header_rows if j in edges or j == n_c else 1)
            d.line([xe, y_top, xe, y], fill=line, width=1)
    d.rectangle([x0, top_body - row_h * header_rows, x0 + table_w, y], outline=(60, 60, 60), width=2)
    if rng.random() < 0.4:
        note = _rnd(rng, ("Source: internal reporting.", "Figures are unaudited.", "Values rounded."))
        cv.text((x0, y + size * 0.4), note, fonts.truetype(regular, int(size * 0.8)), fill=(90, 90, 90))
    style = {"font": family, "size": size, "zebra": zebra, "rules": rules}
    return cv, style


@register("tables", TableOptions, check_table, "data tables with merged cells and mixed number formats")
def make_table(rng: np.random.Generator, opts: TableOptions) -> Draft:
    t = _make_table(rng, opts)
    question, answer, args = _question(rng, t)
    cv, style = _render(rng, t)
    return Draft(
        image=cv.image,
        task="doc_qa",
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta={"table": t, "question": args, "render": style},
        aux={"drawn": cv.drawn, "size": cv.image.size},
        ext=opts.ext,
    )
