"""Documents rendered with PIL and real fonts: receipts, invoices, forms and reports.

Money is kept as ``Decimal`` so totals are exact: a receipt's subtotal is the sum of its line
amounts (quantity x unit price), tax is the subtotal times the rate rounded half-up to cents,
the total is their sum. Questions read fields (store, date, invoice number, a form field, the
checked option, the author), look up line items and key figures, and ask for totals and tax.
``checks.check_doc`` recomputes the money from the line items and requires the answer's text to
have been drawn inside the image.
"""

from __future__ import annotations

import datetime
import textwrap
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

import numpy as np

from data_tools.synth import fonts
from data_tools.synth.checks import check_doc
from data_tools.synth.core import Draft, SynthError, register
from data_tools.synth.layout import TextCanvas

DOC_TYPES = ("receipt", "invoice", "form", "report")
FIRST = ("Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keiko", "Liam",
         "Maya", "Nils", "Olga", "Pavel", "Rosa", "Samir", "Tara", "Umar")  # fmt: skip
LAST = ("Alvarez", "Berger", "Chen", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad", "Ivanova", "Jensen",
        "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Schmidt")  # fmt: skip
STREETS = (
    "Maple Street",
    "Harbor Road",
    "Elm Avenue",
    "Station Square",
    "Mill Lane",
    "Park Boulevard",
    "Oak Drive",
)
CITIES = ("Springfield", "Riverton", "Lakeside", "Fairview", "Brookfield", "Ashford", "Westmere", "Kingsport")
STORES = ("FRESH MART", "Corner Grocer", "QuickStop", "Green Basket", "City Pharmacy", "Book Nook", "Cafe Aroma",
          "HOME & CO", "Bolt Hardware")  # fmt: skip
COMPANIES = ("Northwind Traders", "Blue Ridge Consulting", "Atlas Components Ltd.", "Vega Software GmbH",
             "Helios Energy", "Pinecrest Logistics", "Orion Print Works", "Summit Legal LLP")  # fmt: skip
GOODS = (("Milk 1L", "1.29"), ("Bread", "2.49"), ("Eggs x12", "3.99"), ("Coffee beans", "8.75"), ("Apples 1kg", "2.80"),
         ("Pasta", "1.15"), ("Olive oil", "6.40"), ("Cheddar", "4.35"), ("Bananas", "1.89"), ("Yogurt", "0.99"),
         ("Tomatoes", "2.25"), ("Rice 2kg", "3.60"), ("Batteries AA", "5.99"), ("Notebook", "2.10"),
         ("Shampoo", "4.79"), ("Orange juice", "3.19"), ("Chocolate", "1.75"), ("Tea", "3.45"))  # fmt: skip
SERVICES = (("Consulting hours", "120.00"), ("Software license", "450.00"), ("Server maintenance", "310.00"),
            ("Design work", "95.00"), ("Training session", "600.00"), ("Cloud storage (TB)", "22.50"),
            ("Support plan", "199.00"), ("Printing", "0.35"), ("Site visit", "250.00"), ("Translation (page)", "38.00"))  # fmt: skip
METRICS = ("New customers", "Orders shipped", "Support tickets", "Active users", "Returns", "Site visits")
CENT = Decimal("0.01")


RECEIPT_QUESTIONS = ("total", "tax", "subtotal", "store", "date", "time", "payment", "item_amount", "n_items")
EASY_DOC = dict(  # task "doc_qa": "What is the name of the store?" on receipts of four stores,
    doc_types=["receipt"], receipt_questions=["store"], n_stores=4, store_scale=2.6,  # the name in big type
)  # fmt: skip
# task "doc_qa" on the same receipts: "How many different items are listed on the receipt?" (2-7)
EASY_ITEMS = {**EASY_DOC, "receipt_questions": ["n_items"]}


@dataclass
class DocOptions:
    doc_types: list[str] = field(default_factory=lambda: list(DOC_TYPES))
    ext: str = "png"
    receipt_questions: list[str] = field(default_factory=list)  # RECEIPT_QUESTIONS to ask; [] = all
    n_stores: int = 0  # receipts come from the first n of STORES; 0 = all
    store_scale: float = 1.4  # the store name's font size on receipts, relative to the body text

    def validate(self) -> None:
        bad = sorted(set(self.doc_types) - set(DOC_TYPES)) or ([] if self.doc_types else ["(empty)"])
        if bad:
            raise SynthError(f"synth docs: doc_types {bad} not valid; choose from {', '.join(DOC_TYPES)}")
        if self.ext not in ("png", "jpg"):
            raise SynthError(f"synth docs: ext={self.ext!r}; valid: png, jpg")
        bad = sorted(set(self.receipt_questions) - set(RECEIPT_QUESTIONS))
        if bad:
            raise SynthError(
                f"synth docs: receipt_questions {bad} not valid; choose from {', '.join(RECEIPT_QUESTIONS)}"
            )
        if not 0 <= self.n_stores <= len(STORES):
            raise SynthError(f"synth docs: n_stores={self.n_stores} must be in [0, {len(STORES)}]")
        if not 1.0 <= self.store_scale <= 3.0:
            raise SynthError(f"synth docs: store_scale={self.store_scale} must be in [1, 3]")
        self.doc_types = list(self.doc_types)


def _rnd(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _name(rng) -> str:
    return f"{_rnd(rng, FIRST)} {_rnd(rng, LAST)}"


def _date(rng, after: datetime.date | None = None, style: int | None = None) -> str:
    """A date in one of four printed styles; ``after`` gives a date 7-60 days later (due dates)."""
    if after is None:
        day = datetime.date(int(rng.integers(2015, 2026)), int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    else:
        day = after + datetime.timedelta(days=int(rng.integers(7, 61)))
    y, m, d = day.year, day.month, day.day
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    styles = (
        f"{y}-{m:02d}-{d:02d}",
        f"{m:02d}/{d:02d}/{y}",
        f"{d:02d}.{m:02d}.{y}",
        f"{months[m - 1]} {d}, {y}",
    )
    return styles[int(rng.integers(4)) if style is None else style]


def _parse_date(text: str) -> datetime.date:
    for f in ("%Y-%m-%d", "%m/%d/%Y", "%d.%m.%Y", "%b %d, %Y"):
        try:
            return datetime.datetime.strptime(text, f).date()
        except ValueError:
            continue
    raise ValueError(text)


def _money(v: Decimal, cur: str) -> str:
    return f"{cur}{v:,.2f}"


def _lines(rng, pool, k: int) -> list[dict]:
    idx = rng.choice(len(pool), size=k, replace=False)
    out = []
    for i in idx:
        name, price = pool[int(i)]
        qty = int(rng.integers(1, 4)) if rng.random() < 0.4 else 1
        out.append(
            {"name": name, "qty": qty, "unit": price, "amount": str((Decimal(price) * qty).quantize(CENT))}
        )
    return out


def _totals(items: list[dict], rate: Decimal) -> dict:
    sub = sum((Decimal(it["amount"]) for it in items), Decimal("0"))
    tax = (sub * rate / 100).quantize(CENT, rounding=ROUND_HALF_UP)
    return {"subtotal": str(sub), "tax": str(tax), "total": str(sub + tax), "tax_rate": str(rate)}


# ----------------------------------------------------------------------------- receipt


def _receipt(rng, opts: DocOptions) -> tuple[TextCanvas, dict, tuple[str, str, dict]]:
    items = _lines(rng, GOODS, int(rng.integers(2, 8)))
    rate = Decimal(_rnd(rng, ("5", "7", "8", "10", "6.5")))
    money = _totals(items, rate)
    cur = _rnd(rng, ("$", "€", "£"))
    fields = {"store": _rnd(rng, STORES[: opts.n_stores or len(STORES)]), "date": _date(rng), "time": f"{int(rng.integers(7, 22)):02d}:{int(rng.integers(0, 60)):02d}",
              "payment": _rnd(rng, ("VISA", "CASH", "MASTERCARD", "DEBIT"))}  # fmt: skip
    family = _rnd(rng, ("mono", "sans"))
    size = int(rng.integers(14, 19))
    f, fb = (
        fonts.truetype(fonts.pick(rng, family), size),
        fonts.truetype(fonts.pick(rng, family + "_bold"), size),
    )
    W = int(rng.integers(340, 460))
    paper = tuple(int(v) for v in rng.integers(238, 256, 3))
    cv = TextCanvas(W, 1400, paper)
    m, y, lh = 18, 18, int(size * 1.45)
    cv.text(
        (W / 2, y),
        fields["store"],
        fonts.truetype(fonts.pick(rng, family + "_bold"), int(size * opts.store_scale)),
        anchor="ma",
    )
    y += int(lh * 1.5) + int(size * (opts.store_scale - 1.4))  # room below a larger store name
    cv.text(
        (W / 2, y), f"{int(rng.integers(1, 400))} {_rnd(rng, STREETS)}, {_rnd(rng, CITIES)}", f, anchor="ma"
    )
    y += lh
    cv.text((m, y), f"Date: {fields['date']}", f)
    cv.text((W - m, y), fields["time"], f, anchor="ra")
    y += lh
    cv.text((m, y), "-" * 80, f)
    y += lh
    for it in items:
        cv.text((m, y), it["name"], f)
        cv.text((W - m, y), _money(Decimal(it["amount"]), cur), f, anchor="ra")
        y += lh
        if it["qty"] > 1:
            cv.text((m + 20, y), f"{it['qty']} x {_money(Decimal(it['unit']), cur)}", f, fill=(70, 70, 70))
            y += lh
    cv.text((m, y), "-" * 80, f)
    y += lh
    for label, key, font in (
        ("Subtotal", "subtotal", f),
        (f"Tax ({money['tax_rate']}%)", "tax", f),
        ("TOTAL", "total", fb),
    ):
        cv.text((m, y), label, font)
        cv.text((W - m, y), _money(Decimal(money[key]), cur), font, anchor="ra")
        y += lh
    cv.text((m, y), f"Paid by {fields['payment']}", f)
    y += int(lh * 1.6)
    cv.text(
        (W / 2, y),
        _rnd(rng, ("Thank you!", "Thank you for shopping with us", "Please come again")),
        f,
        anchor="ma",
    )
    cv.crop_height(y + lh + 14)
    meta = {"doc_type": "receipt", "fields": fields, "items": items, "money": money, "currency": cur}
    # questions
    qtype = _rnd(rng, ("total", "total", "tax", "subtotal", "field", "item_amount", "n_items"))
    only = opts.receipt_questions
    if only:  # the preset's questions: a field name asks that printed field
        qtype = _rnd(rng, only)
        qtype, key = ("field", qtype) if qtype in fields else (qtype, None)
    if qtype in ("total", "tax", "subtotal"):
        q = {"total": "What is the total amount on the receipt?", "tax": "How much tax was charged?",
             "subtotal": "What is the subtotal before tax?"}[qtype]  # fmt: skip
        return cv, meta, (q, _money(Decimal(money[qtype]), cur), {"qtype": qtype})
    if qtype == "field":
        key = key if only else _rnd(rng, ("store", "date", "time", "payment"))
        q = {"store": "What is the name of the store?", "date": "What date is printed on the receipt?",
             "time": "At what time was the purchase made?", "payment": "How was the purchase paid?"}[key]  # fmt: skip
        return cv, meta, (q, fields[key], {"qtype": "field", "key": key})
    if qtype == "item_amount":
        k = int(rng.integers(len(items)))
        return (
            cv,
            meta,
            (
                f"How much was paid for {items[k]['name']} in total?",
                _money(Decimal(items[k]["amount"]), cur),
                {"qtype": qtype, "item": k},
            ),
        )
    return (
        cv,
        meta,
        ("How many different items are listed on the receipt?", str(len(items)), {"qtype": qtype}),
    )


# ----------------------------------------------------------------------------- invoice


def _invoice(rng) -> tuple[TextCanvas, dict, tuple[str, str, dict]]:
    items = _lines(rng, SERVICES, int(rng.integers(2, 7)))
    rate = Decimal(_rnd(rng, ("0", "10", "19", "20", "8.5")))
    money = _totals(items, rate)
    cur = _rnd(rng, ("$", "€", "£"))
    style = int(rng.integers(4))
    fields = {"company": _rnd(rng, COMPANIES), "number": f"INV-{int(rng.integers(2015, 2026))}-{int(rng.integers(1, 9999)):04d}",
              "date": _date(rng, style=style), "client": _name(rng),
              "terms": _rnd(rng, ("Net 15", "Net 30", "Net 60", "Due on receipt"))}  # fmt: skip
    fields["due"] = _date(rng, after=_parse_date(fields["date"]), style=style)
    serif = rng.random() < 0.4
    base = "serif" if serif else "sans"
    size = int(rng.integers(13, 17))
    reg, bold = fonts.pick(rng, base), fonts.pick(rng, base + "_bold")
    f, fb, fh = fonts.truetype(reg, size), fonts.truetype(bold, size), fonts.truetype(bold, int(size * 1.9))
    W = int(rng.integers(640, 820))
    cv = TextCanvas(W, 1600, (255, 255, 255))
    accent = _rnd(rng, ((30, 60, 110), (120, 30, 40), (20, 100, 80), (60, 60, 60)))
    m, lh = 40, int(size * 1.55)
    y = m
    cv.text((m, y), fields["company"], fonts.truetype(bold, int(size * 1.4)), fill=accent)
    cv.text((W - m, y), "INVOICE", fh, fill=accent, anchor="ra")
    y += int(lh * 1.3)
    cv.text(
        (m, y), f"{int(rng.integers(1, 300))} {_rnd(rng, STREETS)}, {_rnd(rng, CITIES)}", f, fill=(80, 80, 80)
    )
    y += int(lh * 2)
    for label, key in (("Invoice No.", "number"), ("Invoice date", "date"), ("Due date", "due")):
        cv.text((W - m - 300, y), label + ":", fb)
        cv.text((W - m, y), fields[key], f, anchor="ra")
        y += lh
    y_bill = y - 3 * lh
    cv.text((m, y_bill), "Bill to:", fb)
    cv.text((m, y_bill + lh), fields["client"], f)
    cv.text((m, y_bill + 2 * lh), f"{int(rng.integers(1, 300))} {_rnd(rng, STREETS)}", f)
    y += lh
    cols = [m, W - m - 330, W - m - 200, W - m]  # description | qty | unit | amount (right edges after first)
    cv.draw.rectangle([m, y, W - m, y + lh + 6], fill=accent)
    cv.text((m + 8, y + 4), "Description", fb, fill=(255, 255, 255))
    for x, h in zip(cols[1:], ("Qty", "Unit price", "Amount")):
        cv.text((x - 8, y + 4), h, fb, fill=(255, 255, 255), anchor="ra")
    y += lh + 10
    for it in items:
        cv.text((m + 8, y), it["name"], f)
        for x, v in zip(
            cols[1:], (str(it["qty"]), _money(Decimal(it["unit"]), cur), _money(Decimal(it["amount"]), cur))
        ):
            cv.text((x - 8, y), v, f, anchor="ra")
        y += lh
        cv.draw.line([m, y - 4, W - m, y - 4], fill=(215, 215, 215))
    y += lh // 2
    for label, key, font in (
        ("Subtotal", "subtotal", f),
        (f"Tax ({money['tax_rate']}%)", "tax", f),
        ("Total due", "total", fb),
    ):
        cv.text((W - m - 200, y), label, font, anchor="ra")
        cv.text((W - m - 8, y), _money(Decimal(money[key]), cur), font, anchor="ra")
        y += lh
    y += lh
    cv.text((m, y), f"Payment terms: {fields['terms']}", f, fill=(80, 80, 80))
    cv.crop_height(y + lh + m)
    meta = {"doc_type": "invoice", "fields": fields, "items": items, "money": money, "currency": cur}
    qtype = _rnd(rng, ("total", "tax", "field", "field", "item_amount", "unit_price", "n_items"))
    if qtype in ("total", "tax"):
        q = (
            "What is the total amount due?"
            if qtype == "total"
            else "How much tax is charged on this invoice?"
        )
        return cv, meta, (q, _money(Decimal(money[qtype]), cur), {"qtype": qtype})
    if qtype == "field":
        key = _rnd(rng, ("number", "date", "due", "client", "company", "terms"))
        q = {"number": "What is the invoice number?", "date": "What is the invoice date?", "due": "When is the invoice due?",
             "client": "Who is the invoice billed to?", "company": "Which company issued this invoice?",
             "terms": "What are the payment terms?"}[key]  # fmt: skip
        return cv, meta, (q, fields[key], {"qtype": "field", "key": key})
    k = int(rng.integers(len(items)))
    if qtype == "item_amount":
        return (
            cv,
            meta,
            (
                f"What is the amount for {items[k]['name']}?",
                _money(Decimal(items[k]["amount"]), cur),
                {"qtype": qtype, "item": k},
            ),
        )
    if qtype == "unit_price":
        return (
            cv,
            meta,
            (
                f"What is the unit price of {items[k]['name']}?",
                _money(Decimal(items[k]["unit"]), cur),
                {"qtype": qtype, "item": k},
            ),
        )
    return cv, meta, ("How many line items does the invoice have?", str(len(items)), {"qtype": qtype})


# ----------------------------------------------------------------------------- form


def _form(rng) -> tuple[TextCanvas, dict, tuple[str, str, dict]]:
    name = _name(rng)
    y_, m_, d_ = int(rng.integers(1950, 2006)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    fields = {
        "Full name": name,
        "Date of birth": f"{d_:02d}/{m_:02d}/{y_}",
        "Phone": f"+1 {int(rng.integers(200, 999))}-{int(rng.integers(200, 999))}-{int(rng.integers(0, 9999)):04d}",
        "Email": f"{name.split()[0].lower()}.{name.split()[1].lower()}@example.org",
        "Address": f"{int(rng.integers(1, 500))} {_rnd(rng, STREETS)}",
        "City": _rnd(rng, CITIES),
        "Postal code": f"{int(rng.integers(10000, 99999))}",
        "Member ID": f"M-{int(rng.integers(100000, 999999))}",
    }
    order = list(fields)
    keep = sorted(rng.choice(len(order), size=int(rng.integers(5, len(order) + 1)), replace=False))
    shown = {order[i]: fields[order[i]] for i in keep}
    options = list(
        _rnd(rng, (("Basic", "Standard", "Premium"), ("Student", "Adult", "Senior"), ("Monthly", "Yearly")))
    )
    checked = int(rng.integers(len(options)))
    title = _rnd(
        rng,
        ("Membership Application", "Registration Form", "Patient Information", "Library Card Application"),
    )
    group = _rnd(rng, ("Membership type", "Plan", "Category"))
    base = _rnd(rng, ("sans", "serif"))
    size = int(rng.integers(14, 18))
    f, fb = fonts.truetype(fonts.pick(rng, base), size), fonts.truetype(fonts.pick(rng, base + "_bold"), size)
    fill_font = fonts.truetype(fonts.pick(rng, _rnd(rng, ("mono", "sans", "serif"))), size)
    W = int(rng.integers(560, 760))
    cv = TextCanvas(W, 1400, (255, 255, 255) if rng.random() < 0.7 else (250, 248, 240))
    m, lh = 36, int(size * 2.4)
    y = m
    cv.text((W / 2, y), title, fonts.truetype(fonts.pick(rng, base + "_bold"), int(size * 1.6)), anchor="ma")
    y += int(lh * 1.3)
    label_w = max(fb.getlength(k + ":") for k in shown) + 16
    ink = _rnd(rng, ((20, 20, 120), (0, 0, 0), (30, 30, 30)))
    for k, v in shown.items():
        cv.text((m, y + 6), k + ":", fb)
        cv.draw.rectangle([m + label_w, y, W - m, y + int(size * 1.8)], outline=(120, 120, 120))
        cv.text((m + label_w + 8, y + 6), v, fill_font, fill=ink)
        y += lh
    cv.text((m, y + 4), group + ":", fb)
    x = m + fb.getlength(group + ":") + 20
    box = int(size * 1.1)
    marks = []
    for i, opt in enumerate(options):
        cv.draw.rectangle([x, y + 4, x + box, y + 4 + box], outline=(0, 0, 0), width=2)
        if i == checked:
            cv.draw.line([x + 3, y + 7, x + box - 3, y + 1 + box], fill=ink, width=3)
            cv.draw.line([x + box - 3, y + 7, x + 3, y + 1 + box], fill=ink, width=3)
            marks.append(opt)
        cv.text((x + box + 8, y + 4), opt, f)
        x += box + 8 + f.getlength(opt) + 28
    y += lh
    cv.text((m, y + 10), "Signature: ____________________", f)
    cv.crop_height(y + lh + m)
    meta = {
        "doc_type": "form",
        "fields": shown,
        "options": options,
        "checked": options[checked],
        "title": title,
    }
    if rng.random() < 0.2:
        return (
            cv,
            meta,
            (
                f"Which {group.lower()} option is checked?",
                options[checked],
                {"qtype": "checked", "marks": marks},
            ),
        )
    key = _rnd(rng, list(shown))
    return (
        cv,
        meta,
        (f"What is the {key.lower()} entered on the form?", shown[key], {"qtype": "field", "key": key}),
    )


# ----------------------------------------------------------------------------- report


def _report(rng) -> tuple[TextCanvas, dict, tuple[str, str, dict]]:
    author, date = _name(rng), _date(rng)
    company = _rnd(rng, COMPANIES)
    year = int(rng.integers(2015, 2026))
    quarters = [f"Q{i}" for i in range(1, int(rng.integers(3, 5)) + 1)]
    metrics = [
        METRICS[int(i)] for i in sorted(rng.choice(len(METRICS), size=int(rng.integers(2, 5)), replace=False))
    ]
    figures = {mt: [int(v) for v in rng.integers(100, 20000, size=len(quarters))] for mt in metrics}
    fact_metric, fact_q = metrics[0], int(rng.integers(len(quarters)))
    fact_val = figures[fact_metric][fact_q]
    sentences = [
        f"This report summarizes the operations of {company} during {year}.",
        f"In {quarters[fact_q]}, {fact_metric.lower()} reached {fact_val:,}, "
        + _rnd(
            rng,
            ("a result in line with the plan.", "which exceeded expectations.", "despite seasonal effects."),
        ),
        _rnd(
            rng,
            (
                "Costs remained stable across all regions.",
                "The team expanded into two new markets.",
                "Customer satisfaction improved compared with the previous year.",
            ),
        ),  # fmt: skip
        "Key figures per quarter are listed in the table below.",
    ]
    base = _rnd(rng, ("serif", "sans"))
    size = int(rng.integers(14, 18))
    reg, bold = fonts.pick(rng, base), fonts.pick(rng, base + "_bold")
    f, fb = fonts.truetype(reg, size), fonts.truetype(bold, size)
    W = int(rng.integers(620, 820))
    cv = TextCanvas(W, 1600, (255, 255, 255))
    m, lh = 44, int(size * 1.5)
    y = m
    title = f"{_rnd(rng, ('Annual', 'Operations', 'Performance', 'Quarterly'))} Report {year}"
    cv.text((m, y), title, fonts.truetype(bold, int(size * 1.8)))
    y += int(lh * 1.8)
    cv.text((m, y), f"Prepared by {author}", f, fill=(70, 70, 70))
    cv.text((W - m, y), date, f, fill=(70, 70, 70), anchor="ra")
    y += int(lh * 1.6)
    chars = max(20, int((W - 2 * m) / (f.getlength("x") * 1.05)))
    for line in textwrap.wrap(" ".join(sentences), width=chars):
        cv.text((m, y), line, f)
        y += lh
    y += lh
    col_w = (W - 2 * m - 200) / len(quarters)
    cv.text((m, y), "Metric", fb)
    for i, q in enumerate(quarters):
        cv.text((m + 200 + col_w * (i + 1) - 8, y), q, fb, anchor="ra")
    y += lh
    cv.draw.line([m, y - 4, W - m, y - 4], fill=(0, 0, 0), width=2)
    for mt in metrics:
        cv.text((m, y), mt, f)
        for i, v in enumerate(figures[mt]):
            cv.text((m + 200 + col_w * (i + 1) - 8, y), f"{v:,}", f, anchor="ra")
        y += lh
    cv.crop_height(y + m)
    meta = {"doc_type": "report", "fields": {"author": author, "date": date, "title": title}, "quarters": quarters,
            "figures": figures, "fact": {"metric": fact_metric, "quarter": fact_q}}  # fmt: skip
    qtype = _rnd(rng, ("field", "figure", "figure", "fact", "best_quarter"))
    if qtype == "field":
        key = _rnd(rng, ("author", "date", "title"))
        q = {
            "author": "Who prepared the report?",
            "date": "What date is on the report?",
            "title": "What is the title of the report?",
        }[key]
        return cv, meta, (q, meta["fields"][key], {"qtype": qtype, "key": key})
    if qtype in ("figure", "fact"):
        mt, qi = (
            (fact_metric, fact_q)
            if qtype == "fact"
            else (_rnd(rng, metrics), int(rng.integers(len(quarters))))
        )
        q = f"What was the number of {mt.lower()} in {quarters[qi]}?"
        return cv, meta, (q, f"{figures[mt][qi]:,}", {"qtype": "figure", "metric": mt, "quarter": qi})
    mt = _rnd(rng, metrics)
    vals = figures[mt]
    if vals.count(max(vals)) > 1:
        return cv, meta, ("Who prepared the report?", author, {"qtype": "field", "key": "author"})
    return (
        cv,
        meta,
        (
            f"In which quarter were {mt.lower()} highest?",
            quarters[vals.index(max(vals))],
            {"qtype": qtype, "metric": mt},
        ),
    )


@register("docs", DocOptions, check_doc, "receipts, invoices, forms, reports (PIL + TTF fonts)")
def make_doc(rng: np.random.Generator, opts: DocOptions) -> Draft:
    kind = _rnd(rng, opts.doc_types)
    make = {"receipt": lambda r: _receipt(r, opts), "invoice": _invoice, "form": _form, "report": _report}
    cv, meta, (question, answer, args) = make[kind](rng)
    return Draft(
        image=cv.image,
        task="doc_qa",
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta={**meta, "question": args},
        aux={"drawn": cv.drawn, "size": cv.image.size},
        ext=opts.ext,
    )
