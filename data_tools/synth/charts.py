"""Charts drawn with matplotlib (Agg, no pyplot) and questions answered from their data.

Chart types: bar, hbar, grouped_bar, stacked_bar, line, area, pie, scatter. Each sample picks a
topic (measure, unit, kind of category), data, a matplotlib style sheet, a palette, a font,
gridlines, legend placement, value labels, title, units, sometimes a log axis and long
category names. Question types: lookup, extremum, comparison, difference, ratio, trend, count,
multiple_choice, yes_no, unanswerable, total.

Numbers in answers are printed with the data's number of decimals (ratios with two); the
unanswerable answer is ``UNANSWERABLE``. ``meta`` stores the data table, the question type and
its arguments, so ``checks.check_chart`` can re-derive every answer, and ``aux`` carries the
text that actually landed inside the figure, so the check can also refuse a question about a
category whose label was cut off.

``EASY_CHART`` is the demo's preset: a small bar chart of four fixed categories and "Which category
has the highest ...?" (read the label of the tallest bar, at least twice as tall as any other:
``extremum="highest"``, ``lead=0.5``; blind baseline ~25%)::

    generate("charts", n, seed, out, **EASY_CHART)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib
import numpy as np
from matplotlib import style as mpl_style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from data_tools.synth import fonts
from data_tools.synth.checks import UNANSWERABLE, check_chart
from data_tools.synth.core import Draft, SynthError, register

CHART_TYPES = ("bar", "hbar", "grouped_bar", "stacked_bar", "line", "area", "pie", "scatter")
STYLES = (
    "default", "ggplot", "bmh", "seaborn-v0_8-whitegrid", "seaborn-v0_8-darkgrid", "fivethirtyeight",
    "Solarize_Light2", "classic", "grayscale", "dark_background", "tableau-colorblind10", "seaborn-v0_8-pastel",
    "seaborn-v0_8-ticks", "petroff10",
)  # fmt: skip
PALETTES = (
    None,
    "tab10",
    "Set2",
    "Set1",
    "Dark2",
    "Paired",
    "tab20b",
    "Accent",
    "viridis",
    "plasma",
    "cividis",
)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
CATEGORY_POOLS = {
    "country": ("Brazil", "Canada", "Chile", "Egypt", "France", "Germany", "India", "Japan", "Kenya", "Mexico",
                "Norway", "Peru", "Poland", "Spain", "Sweden", "Turkey", "Vietnam", "Italy", "Ghana", "Nepal"),
    "city": ("Lyon", "Osaka", "Austin", "Porto", "Leeds", "Quito", "Perth", "Gdansk", "Tucson", "Bergen",
             "Hanoi", "Accra", "Cusco", "Bilbao", "Malmo", "Izmir"),
    "product": ("Model A", "Model B", "Model C", "Model D", "Model E", "Model F", "Basic", "Plus", "Pro", "Max",
                "Lite", "Ultra"),
    "department": ("Marketing", "Finance", "Research", "Logistics", "Legal", "Sales", "Support", "Operations",
                   "Engineering", "Design"),
    "long": ("Northern Regional Distribution Center", "Customer Support Operations", "Research and Development",
             "International Sales Division", "Human Resources and Training", "Quality Assurance Laboratory",
             "Procurement and Supply Chain", "Corporate Communications", "Facilities Management Group",
             "Data Infrastructure Team"),
    "fruit": ("Apples", "Bananas", "Cherries", "Grapes", "Lemons", "Mangoes", "Oranges", "Pears", "Plums", "Kiwis"),
}  # fmt: skip
SERIES_POOLS = (
    ("Online", "In-store", "Wholesale", "Export"),
    ("North", "South", "East", "West"),
    ("Men", "Women"),
    ("Urban", "Rural", "Suburban"),
    ("Team A", "Team B", "Team C", "Team D"),
    ("Budget", "Actual", "Forecast"),
)
TOPICS = (  # measure, unit (may be ""), value scale
    ("Revenue", "million USD", 100.0),
    ("Sales", "units", 1000.0),
    ("Population", "thousands", 500.0),
    ("Average temperature", "°C", 30.0),
    ("Rainfall", "mm", 200.0),
    ("Number of employees", "", 300.0),
    ("Energy use", "GWh", 50.0),
    ("Website visits", "thousands", 80.0),
    ("Average price", "USD", 40.0),
    ("Production", "tonnes", 5000.0),
    ("Satisfaction score", "points", 10.0),
)


EASY_CHART = dict(  # task "chart_qa"; the check verifies the answer like any other chart's
    chart_types=["bar"], question_types=["extremum"], categories=["North", "East", "South", "West"],
    styles=["default"], dpi=30, extremum="highest", lead=0.5,  # the tallest bar is twice any other
)  # fmt: skip
QUESTION_TYPES = ("lookup", "extremum", "comparison", "difference", "ratio", "count", "multiple_choice",
                  "yes_no", "unanswerable", "trend", "total")  # fmt: skip


@dataclass
class ChartOptions:
    chart_types: list[str] = field(default_factory=lambda: list(CHART_TYPES))
    dpi: int = 100
    ext: str = "png"
    question_types: list[str] = field(default_factory=list)  # [] = every type the chart allows
    categories: list[str] = field(default_factory=list)  # fixed category names, in order; [] = drawn
    styles: list[str] = field(default_factory=list)  # matplotlib style sheets to pick from; [] = STYLES
    extremum: str = "both"  # which extremum questions ask for: highest|lowest|both
    lead: float = 0.0  # single-series bars: every other value <= (1 - lead) x the largest (0 = any data)

    def validate(self) -> None:
        bad = sorted(set(self.chart_types) - set(CHART_TYPES)) or ([] if self.chart_types else ["(empty)"])
        if bad:
            raise SynthError(
                f"synth charts: chart_types {bad} not valid; choose from {', '.join(CHART_TYPES)}"
            )
        if not 30 <= self.dpi <= 300:
            raise SynthError(f"synth charts: dpi={self.dpi} must be in [30, 300]")
        if self.ext not in ("png", "jpg"):
            raise SynthError(f"synth charts: ext={self.ext!r}; valid: png, jpg")
        for name, given, valid in (("question_types", self.question_types, QUESTION_TYPES),
                                   ("styles", self.styles, STYLES)):  # fmt: skip
            bad = sorted(set(given) - set(valid))
            if bad:
                raise SynthError(f"synth charts: {name} {bad} not valid; choose from {', '.join(valid)}")
        if self.categories and not 2 <= len(set(self.categories)) == len(self.categories) <= 12:
            raise SynthError(f"synth charts: categories must be 2-12 distinct names, got {self.categories}")
        if self.categories and "scatter" in self.chart_types:
            raise SynthError("synth charts: categories do not apply to scatter charts; drop one of them")
        if self.extremum not in ("highest", "lowest", "both"):
            raise SynthError(f"synth charts: extremum={self.extremum!r}; valid: highest, lowest, both")
        if not 0.0 <= self.lead <= 0.9:
            raise SynthError(f"synth charts: lead={self.lead} must be in [0, 0.9]")
        self.chart_types = list(self.chart_types)


def fmt(v: float, decimals: int) -> str:
    return f"{v:.{decimals}f}"


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


# ----------------------------------------------------------------------------- data


def _categories(rng: np.random.Generator, n: int, kind: str) -> tuple[list[str], str]:
    """n category names and the noun for one of them."""
    if kind == "year":
        start = int(rng.integers(1995, 2020))
        return [str(start + i) for i in range(n)], "year"
    if kind == "month":
        start = int(rng.integers(0, 13 - n))
        return list(MONTHS[start : start + n]), "month"
    if kind == "quarter":
        year = int(rng.integers(2015, 2024))
        return [f"Q{q % 4 + 1} {year + q // 4}" for q in range(n)], "quarter"
    pool = CATEGORY_POOLS[kind]
    idx = rng.choice(len(pool), size=n, replace=False)
    noun = {"long": "unit", "fruit": "fruit"}.get(kind, kind)
    return [pool[i] for i in sorted(idx)], noun


def _values(
    rng: np.random.Generator, shape: tuple[int, ...], scale: float, decimals: int, trend: bool
) -> np.ndarray:
    if trend:  # random walks with drift, for lines and areas
        steps = rng.normal(rng.uniform(-0.15, 0.15), 0.12, size=shape)
        v = scale * (0.5 + 0.5 * rng.random((shape[0], 1))) * np.exp(np.cumsum(steps, axis=-1))
    else:
        v = scale * rng.uniform(0.05, 1.0, size=shape)
    return np.round(v, decimals)


def _make_data(rng: np.random.Generator, ctype: str, fixed: list[str]) -> dict:
    measure, unit, scale = _pick(rng, TOPICS)
    decimals = int(rng.choice(3, p=[0.55, 0.35, 0.1]))
    log = False
    if fixed:  # the given categories, in order
        n, kind = len(fixed), "fixed"
    elif ctype in ("line", "area"):
        n, kind = int(rng.integers(5, 11)), _pick(rng, ("year", "month", "quarter"))
    elif ctype == "pie":
        n, kind = int(rng.integers(3, 7)), _pick(rng, ("country", "product", "department", "fruit", "city"))
    else:
        n = int(rng.integers(3, 8))
        kinds = ("year", "country", "city", "product", "department", "fruit", "quarter")
        kind = "long" if (ctype in ("hbar", "bar") and rng.random() < 0.2) else _pick(rng, kinds)
        n = min(n, 6) if kind == "long" else n
    cats, noun = (list(fixed), "category") if fixed else _categories(rng, n, kind)
    n_series = 1
    if ctype in ("grouped_bar", "stacked_bar", "area"):
        n_series = int(rng.integers(2, 4))
    elif ctype == "line":
        n_series = int(rng.integers(1, 4))
    pool = _pick(rng, [p for p in SERIES_POOLS if len(p) >= n_series])
    series = list(pool[:n_series]) if n_series > 1 else [measure]
    if ctype == "pie":
        raw = rng.uniform(0.5, 3.0, size=n)
        pct = np.round(100 * raw / raw.sum(), 1)
        pct[-1] = np.round(100.0 - pct[:-1].sum(), 1)
        if pct[-1] <= 0.5:
            pct = np.round(np.full(n, 100.0 / n), 1)
            pct[-1] = np.round(100.0 - pct[:-1].sum(), 1)
        values = pct[None, :]
        measure, unit, decimals = "Share", "%", 1
    elif ctype in ("bar", "hbar", "line") and rng.random() < 0.1:
        log = True
        values = np.round(10 ** rng.uniform(0.0, 5.0, size=(n_series, n)), 0)
        decimals = 0
    else:
        values = _values(rng, (n_series, n), scale, decimals, trend=ctype in ("line", "area"))
        values = np.maximum(values, 10.0**-decimals)
    return {
        "chart_type": ctype,
        "measure": measure,
        "unit": unit,
        "categories": cats,
        "category_noun": noun,
        "category_kind": kind,
        "series": series,
        "values": values.tolist(),  # (n_series, n_categories)
        "decimals": decimals,
        "log_scale": log,
    }


def _make_scatter(rng: np.random.Generator) -> dict:
    n_series = int(rng.integers(1, 4))
    pool = _pick(rng, [p for p in SERIES_POOLS if len(p) >= n_series])
    xname, yname = _pick(rng, (("Height (cm)", "Weight (kg)"), ("Age (years)", "Income (k USD)"),
                               ("Temperature (°C)", "Sales (units)"), ("Hours studied", "Test score"),
                               ("Price (USD)", "Rating")))  # fmt: skip
    pts = []
    for _ in range(n_series):
        k = int(rng.integers(4, 16))
        cx, cy = rng.uniform(10, 90, size=2)
        xy = np.round(np.stack([cx + rng.normal(0, 12, k), cy + rng.normal(0, 12, k)], 1), 1)
        pts.append(xy.tolist())
    return {
        "chart_type": "scatter",
        "x_label": xname,
        "y_label": yname,
        "series": list(pool[:n_series]) if n_series > 1 else ["Observations"],
        "points": pts,  # per series: [[x, y], ...]
        "decimals": 1,
    }


# ----------------------------------------------------------------------------- questions


def _absent_categories(data: dict) -> list[str]:
    """Names of the chart's kind of category that the chart does not show."""
    kind, cats = data["category_kind"], data["categories"]
    if kind == "year":
        cands = [str(int(cats[0]) - 3), str(int(cats[-1]) + 4)]
    elif kind == "month":
        cands = list(MONTHS)
    elif kind == "quarter":
        q, y = cats[-1].split()
        cands = [f"{q} {int(y) + 2}"]
    else:
        cands = list(CATEGORY_POOLS.get(kind, ()))  # none for fixed categories
    return [c for c in cands if c not in cats] or ["Atlantis"]


def _unique_arg(values: list[float], fn) -> int | None:
    target = fn(values)
    hits = [i for i, v in enumerate(values) if v == target]
    return hits[0] if len(hits) == 1 else None


class _Unaskable(Exception):
    """No allowed question has a unique answer on this data (e.g. tied highest and lowest bars)."""


def _question(
    rng: np.random.Generator, data: dict, only: list[str], tries: int = 0, extremum: str = "both"
) -> tuple[str, str, dict]:
    """(question, answer, {"qtype", ...args}) from the data table; ``only`` restricts the types and
    ``extremum`` which extremum an extremum or multiple-choice question asks for."""
    if tries > 50:
        raise _Unaskable
    if data["chart_type"] == "scatter":
        return _scatter_question(rng, data)
    ctype, cats, series, d = data["chart_type"], data["categories"], data["series"], data["decimals"]
    V = data["values"]
    measure, noun = data["measure"].lower(), data["category_noun"]
    multi = len(series) > 1
    s = int(rng.integers(len(series)))
    of_series = f" for {series[s]}" if multi else ""
    row = V[s]
    qtypes = [
        "lookup",
        "extremum",
        "comparison",
        "difference",
        "ratio",
        "count",
        "multiple_choice",
        "yes_no",
        "unanswerable",
    ]
    if ctype in ("line", "area"):
        qtypes += ["trend", "trend"]
    if ctype == "stacked_bar":
        qtypes += ["total"]
    if only:
        qtypes = [q for q in qtypes if q in only] or [only[0]]
    qtype = _pick(rng, qtypes)
    args: dict = {"qtype": qtype, "series": s}
    i, j = (int(x) for x in rng.choice(len(cats), size=2, replace=False))
    if qtype == "lookup":
        args["cat"] = i
        q = f"What is the {measure} of {cats[i]}{of_series}?"
        if ctype == "pie":
            q = f"What percentage share does {cats[i]} have?"
        return q, fmt(row[i], d), args
    if qtype in ("extremum", "multiple_choice"):
        highest = rng.random() < 0.5
        if extremum != "both":
            highest = extremum == "highest"
        k = _unique_arg(row, max if highest else min)
        if k is None:
            return _question(rng, data, only, tries + 1, extremum)
        word = "highest" if highest else "lowest"
        args.update(highest=highest)
        q = f"Which {noun} has the {word} {measure}{of_series}?"
        if qtype == "extremum":
            return q, cats[k], args
        n_opt = min(4, len(cats))
        others = [c for c in range(len(cats)) if c != k]
        opts = [k] + [int(c) for c in rng.choice(others, size=n_opt - 1, replace=False)]
        opts = [opts[int(p)] for p in rng.permutation(n_opt)]
        letters = "ABCD"[:n_opt]
        args["options"] = opts
        lines = "\n".join(f"{letters[t]}. {cats[c]}" for t, c in enumerate(opts))
        return f"{q}\n{lines}\nAnswer with the option's letter.", letters[opts.index(k)], args
    if qtype in ("comparison", "yes_no"):
        if row[i] == row[j]:
            return _question(rng, data, only, tries + 1, extremum)
        args.update(cat=i, other=j)
        if qtype == "comparison":
            return (
                f"Which has the higher {measure}{of_series}: {cats[i]} or {cats[j]}?",
                cats[i] if row[i] > row[j] else cats[j],
                args,
            )
        return (
            f"Is the {measure} of {cats[i]} greater than that of {cats[j]}{of_series}?",
            "Yes" if row[i] > row[j] else "No",
            args,
        )
    if qtype == "difference":
        args.update(cat=i, other=j)
        return (
            f"What is the difference in {measure} between {cats[i]} and {cats[j]}{of_series}?",
            fmt(abs(row[i] - row[j]), d),
            args,
        )
    if qtype == "ratio":
        args.update(cat=i, other=j)
        return (
            f"What is the ratio of the {measure} of {cats[i]} to that of {cats[j]}{of_series}?",
            f"{row[i] / row[j]:.2f}",
            args,
        )
    if qtype == "count":
        if multi and rng.random() < 0.4:
            args["what"] = "series"
            return "How many series are shown in the legend?", str(len(series)), args
        args["what"] = "categories"
        word = "slices" if ctype == "pie" else f"{noun}s" if not noun.endswith("y") else f"{noun[:-1]}ies"
        return f"How many {word} are shown in the chart?", str(len(cats)), args
    if qtype == "trend":
        if row[0] == row[-1]:
            return _question(rng, data, only, tries + 1, extremum)
        up = row[-1] > row[0]
        return (
            f"Overall, does the {measure}{of_series} increase or decrease from {cats[0]} to {cats[-1]}?",
            "increase" if up else "decrease",
            args,
        )
    if qtype == "total":
        args["cat"] = i
        return (
            f"What is the total {measure} of {cats[i]} across all series?",
            fmt(sum(r[i] for r in V), d),
            args,
        )
    # unanswerable: a category of the same kind that the chart does not show
    name = _pick(rng, _absent_categories(data))
    args["absent"] = name
    return f"What is the {measure} of {name}{of_series}?", UNANSWERABLE, args


def _scatter_question(rng: np.random.Generator, data: dict) -> tuple[str, str, dict]:
    series, pts = data["series"], data["points"]
    multi = len(series) > 1
    qtype = _pick(rng, ["count", "count", "extremum", "yes_no"] + (["comparison"] if multi else []))
    s = int(rng.integers(len(series)))
    ylab = data["y_label"].split(" (")[0].lower()
    args: dict = {"qtype": qtype, "series": s}
    if qtype == "count":
        if multi:
            return f"How many points are in the {series[s]} series?", str(len(pts[s])), args
        return "How many data points are shown?", str(len(pts[s])), args
    if qtype == "extremum":
        ys = [p[1] for ser in pts for p in ser]
        if ys.count(max(ys)) > 1:
            return _scatter_question(rng, data)
        if multi:
            best = max(range(len(series)), key=lambda t: max(p[1] for p in pts[t]))
            return f"Which series contains the point with the highest {ylab}?", series[best], args
        args["qtype"] = "max_y"
        return f"What is the highest {ylab} among the points?", fmt(max(ys), data["decimals"]), args
    if qtype == "comparison":
        o = (s + 1) % len(series)
        if len(pts[s]) == len(pts[o]):
            return _scatter_question(rng, data)
        args["other"] = o
        more = series[s] if len(pts[s]) > len(pts[o]) else series[o]
        return f"Which series has more points: {series[s]} or {series[o]}?", more, args
    thr = float(np.round(rng.uniform(20, 90), 0))
    args["threshold"] = thr
    ys = [p[1] for p in pts[s]]
    if any(abs(y - thr) < 1.0 for y in ys):
        return _scatter_question(rng, data)
    of = f" in the {series[s]} series" if multi else ""
    return f"Is any point{of} above {ylab} {thr:g}?", "Yes" if max(ys) > thr else "No", args


# ----------------------------------------------------------------------------- drawing


def _colors(rng: np.random.Generator, name: str | None, k: int) -> list | None:
    if name is None:
        return None
    cmap = matplotlib.colormaps[name]
    if getattr(cmap, "N", 256) < 64:  # qualitative
        start = int(rng.integers(0, max(1, cmap.N - k + 1)))
        return [cmap(start + t) for t in range(k)]
    return [cmap(x) for x in np.linspace(0.1, 0.85, k)]


def _draw(rng: np.random.Generator, data: dict, opts: ChartOptions) -> tuple[Image.Image, dict, set[str]]:
    ctype, dpi = data["chart_type"], opts.dpi
    style_name = _pick(rng, opts.styles or STYLES)
    family = _pick(rng, fonts.matplotlib_families())
    fsize = float(rng.integers(16, 24)) / 2  # half points: matplotlib's font cache keys on size
    w, h = float(rng.uniform(4.2, 6.4)), float(rng.uniform(3.2, 4.8))
    if ctype == "pie":
        h = max(h, 3.8)
    palette = _pick(rng, PALETTES)
    grid = rng.random() < 0.5
    value_labels = rng.random() < 0.45
    show_title = rng.random() < 0.8
    legend_loc = _pick(rng, ("best", "upper right", "upper left", "lower right", "outside"))
    style_meta = {"style": style_name, "font": family, "font_size": round(fsize, 1), "palette": palette,
                  "grid": grid, "value_labels": value_labels, "title": show_title, "legend": legend_loc}  # fmt: skip
    rc = {"font.family": family, "font.size": fsize, "axes.titlesize": fsize * 1.15, "axes.labelsize": fsize}
    with mpl_style.context(style_name), matplotlib.rc_context(rc):
        fig = Figure(figsize=(w, h), dpi=dpi)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if ctype == "scatter":
            cols = _colors(rng, palette, len(data["series"])) or [None] * len(data["series"])
            markers = ("o", "s", "^", "D")
            for t, (name, pts) in enumerate(zip(data["series"], data["points"])):
                xy = np.asarray(pts)
                ax.scatter(
                    xy[:, 0],
                    xy[:, 1],
                    color=cols[t],
                    marker=markers[t % 4],
                    label=name,
                    s=float(rng.uniform(18, 45)),
                )
            ax.set_xlabel(data["x_label"])
            ax.set_ylabel(data["y_label"])
            title = f"{data['y_label'].split(' (')[0]} vs. {data['x_label'].split(' (')[0]}"
        else:
            cats, V, names = data["categories"], np.asarray(data["values"]), data["series"]
            cols = _colors(rng, palette, len(cats) if ctype == "pie" else len(names))
            ylabel = data["measure"] + (f" ({data['unit']})" if data["unit"] else "")
            x = np.arange(len(cats))
            d = data["decimals"]
            title = f"{data['measure']} by {data['category_noun']}"
            if ctype == "pie":
                wedges, *_ = ax.pie(V[0], labels=cats, colors=cols, startangle=float(rng.uniform(0, 360)),
                                    autopct=(lambda p: f"{p:.1f}%") if value_labels else None,
                                    textprops={"fontsize": fsize * 0.9})  # fmt: skip
                ax.set_aspect("equal")
                title = f"Share by {data['category_noun']}"
            elif ctype in ("bar", "hbar"):
                c = cols[0] if cols else None
                if ctype == "hbar":
                    bars = ax.barh(x, V[0], color=c, height=0.6)
                else:
                    bars = ax.bar(x, V[0], color=c, width=0.6)
                if value_labels:
                    ax.bar_label(bars, labels=[fmt(v, d) for v in V[0]], fontsize=fsize * 0.8, padding=2)
            elif ctype in ("grouped_bar", "stacked_bar"):
                k = len(names)
                bottom = np.zeros(len(cats))
                for t, name in enumerate(names):
                    c = cols[t] if cols else None
                    if ctype == "grouped_bar":
                        bw = 0.8 / k
                        bars = ax.bar(x - 0.4 + bw * (t + 0.5), V[t], width=bw, color=c, label=name)
                    else:
                        bars = ax.bar(x, V[t], bottom=bottom, width=0.6, color=c, label=name)
                        bottom = bottom + V[t]
                    if value_labels:
                        ax.bar_label(bars, labels=[fmt(v, d) for v in V[t]], fontsize=fsize * 0.7,
                                     label_type="center" if ctype == "stacked_bar" else "edge")  # fmt: skip
            elif ctype in ("line", "area"):
                markers = (None, "o", "s", "^", "D")
                mk = _pick(rng, markers)
                if ctype == "area" and rng.random() < 0.5:
                    ax.stackplot(x, V, labels=names, colors=cols, alpha=0.85)
                    data["stacked"] = True
                else:
                    for t, name in enumerate(names):
                        c = cols[t] if cols else None
                        ax.plot(
                            x, V[t], marker=mk, color=c, label=name, linewidth=float(rng.uniform(1.2, 2.5))
                        )
                        if ctype == "area":
                            ax.fill_between(x, V[t], alpha=0.25, color=ax.lines[-1].get_color())
                        if value_labels:
                            for xi, v in zip(x, V[t]):
                                ax.annotate(fmt(v, d), (xi, v), textcoords="offset points", xytext=(0, 4),
                                            ha="center", fontsize=fsize * 0.7)  # fmt: skip
                    data["stacked"] = False
            if ctype != "pie":
                long = max(len(c) for c in cats) > 9
                crowded = len(cats) * max(len(c) for c in cats) > 6.5 * w * 72 / fsize / 1.6
                if ctype == "hbar":
                    ax.set_yticks(x, cats)
                    ax.set_xlabel(ylabel)
                    ax.invert_yaxis()
                else:
                    ax.set_xticks(
                        x, cats, rotation=(30 if long or crowded else 0), ha="right" if long else "center"
                    )
                    ax.set_ylabel(ylabel)
                if data["log_scale"]:
                    (ax.set_xscale if ctype == "hbar" else ax.set_yscale)("log")
        if ctype != "pie":
            if grid:
                ax.grid(True, alpha=0.5)
            else:
                ax.grid(False)
            ax.set_axisbelow(True)
        if len(data["series"]) > 1:
            if legend_loc == "outside":
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=fsize * 0.85)
            else:
                ax.legend(loc=legend_loc, fontsize=fsize * 0.85)
        if show_title:
            ax.set_title(title)
        _layout(fig, ax, data, fsize, w, h, legend_loc == "outside", show_title)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())  # (H, W, 4)
        img = Image.fromarray(rgba[..., :3].copy())
        visible = _visible_text(fig, ax, canvas)
    return img, style_meta, visible


def _layout(
    fig: Figure, ax, data: dict, fsize: float, w: float, h: float, legend_out: bool, title: bool
) -> None:
    """Margins from estimated label sizes (points); ~3x cheaper than ``tight_layout``.

    An estimate that is too small cuts a label off; the check then refuses questions about it.
    """
    ctype = data["chart_type"]
    char = 0.62 * fsize  # average glyph width in points
    line = 1.35 * fsize
    W, H = 72.0 * w, 72.0 * h
    if ctype == "pie":
        fig.subplots_adjust(
            left=0.12, right=0.88 if not legend_out else 0.7, bottom=0.06, top=0.9 if title else 0.96
        )
        return
    cats = data.get("categories", [])
    if ctype == "scatter":
        y_tick, x_tick_h = 3 * char, line
    elif ctype == "hbar":
        y_tick, x_tick_h = max(len(c) for c in cats) * char, line
    else:
        y_tick = (
            3
            if data["log_scale"]
            else max(len(f"{v:.0f}") for r in data["values"] for v in r) + (1 if data["decimals"] else 0)
        ) * char
        labels = ax.get_xticklabels()
        rotated = bool(labels) and labels[0].get_rotation() != 0
        x_tick_h = (0.5 * max(len(c) for c in cats) * char + line) if rotated else line
    left = (y_tick + line + 14) / W
    bottom = (x_tick_h + line + 12) / H
    right = 1 - 10 / W
    if legend_out:
        right = 1 - (max(len(n) for n in data["series"]) * 0.85 * char + 40) / W
    top = 1 - ((line * 1.3 if title else 0) + 10) / H
    if ctype not in ("hbar", "scatter") and x_tick_h > line:  # right-aligned rotated labels reach left
        reach = 0.87 * len(cats[0]) * char - 0.5 * W * (right - left) / len(cats) + 12
        left = max(left, reach / W)
    fig.subplots_adjust(
        left=min(left, 0.45), right=max(right, 0.55), bottom=min(bottom, 0.45), top=max(top, 0.6)
    )


def _visible_text(fig: Figure, ax, canvas: FigureCanvasAgg) -> set[str]:
    """Strings of tick labels, legend entries and axes texts (pie labels) drawn wholly inside the figure."""
    renderer = canvas.get_renderer()
    W, H = fig.bbox.width, fig.bbox.height
    out: set[str] = set()
    legend = ax.get_legend()
    texts = [*ax.get_xticklabels(), *ax.get_yticklabels(), *ax.texts, *(legend.get_texts() if legend else [])]
    for t in texts:
        s = t.get_text()
        if not s or not t.get_visible():
            continue
        bb = t.get_window_extent(renderer)
        if bb.x0 >= -0.5 and bb.y0 >= -0.5 and bb.x1 <= W + 0.5 and bb.y1 <= H + 0.5:
            out.add(s)
    return out


def _give_lead(data: dict, lead: float) -> bool:
    """Scale every value of a single-series bar chart but its largest to <= (1 - lead) x the largest, so
    the tallest bar stands out; False (draw new data) for other charts, log axes or a tie at the top."""
    if data["chart_type"] not in ("bar", "hbar") or data["log_scale"] or len(data["values"]) != 1:
        return False
    row, d = np.asarray(data["values"][0]), data["decimals"]
    k = int(np.argmax(row))
    scaled = np.maximum(np.floor(row * (1 - lead) * 10**d) / 10**d, 10.0**-d)
    scaled[k] = row[k]
    if (scaled == row[k]).sum() > 1:
        return False
    data["values"] = [scaled.tolist()]
    return True


@register("charts", ChartOptions, check_chart, "matplotlib charts (8 types) with data-derived QA")
def make_chart(rng: np.random.Generator, opts: ChartOptions) -> Draft:
    ctype = _pick(rng, opts.chart_types)
    while True:  # new data when no allowed question has a unique answer on it
        data = _make_scatter(rng) if ctype == "scatter" else _make_data(rng, ctype, opts.categories)
        if opts.lead and not _give_lead(data, opts.lead):
            continue
        try:
            question, answer, qargs = _question(rng, data, opts.question_types, extremum=opts.extremum)
            break
        except _Unaskable:
            continue
    img, style_meta, visible = _draw(rng, data, opts)
    return Draft(
        image=img,
        task="chart_qa",
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta={"data": data, "question": qargs, "render": style_meta},
        aux={"visible_text": visible},
        ext=opts.ext,
    )
