"""Multi-page invoices: one sample is a 2-4 page document, its pages asked about together.

The line items run over one or more pages ("Page i of n" at the foot of each, a "(continued)"
header after the first); the subtotal, tax and "Total due" block follows the last item, and some
invoices end with a page of terms, so the total is not always on the last page. Questions:
"On which page is the total?" (the 1-based page number) and "What is the total?" (the amount as
printed). Money is ``Decimal`` as in ``docs.py``; ``checks.check_invoice_pages`` recomputes the
total from every page's items and finds the page where "Total due" was drawn.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np

from data_tools.synth import fonts
from data_tools.synth.checks import check_invoice_pages
from data_tools.synth.core import Draft, SynthError, register
from data_tools.synth.docs import (
    CITIES,
    COMPANIES,
    GOODS,
    SERVICES,
    STREETS,
    _date,
    _lines,
    _money,
    _name,
    _rnd,
    _totals,
)
from data_tools.synth.layout import TextCanvas

QUESTIONS = ("total_page", "total")
TERMS = (
    "Payment is due within the period stated on the first page. Late payments accrue interest of "
    "1.5% per month on the outstanding balance.",
    "Please quote the invoice number with every payment. Bank charges are borne by the payer.",
    "Goods and services remain our property until paid in full. Claims must be made in writing "
    "within 14 days of the invoice date.",
    "All prices are stated in the invoice currency. Questions about this invoice: contact our "
    "accounts department.",
)


@dataclass
class InvoicePagesOptions:
    min_pages: int = 2
    max_pages: int = 4
    questions: list[str] = field(default_factory=lambda: list(QUESTIONS))
    ext: str = "png"

    def validate(self) -> None:
        if not 2 <= self.min_pages <= self.max_pages <= 6:
            raise SynthError(
                f"synth invoices: pages {self.min_pages}..{self.max_pages}; need 2 <= min_pages <= max_pages <= 6"
            )
        bad = sorted(set(self.questions) - set(QUESTIONS)) or ([] if self.questions else ["(empty)"])
        if bad:
            raise SynthError(f"synth invoices: questions {bad} not valid; choose from {', '.join(QUESTIONS)}")
        if self.ext not in ("png", "jpg"):
            raise SynthError(f"synth invoices: ext={self.ext!r}; valid: png, jpg")
        self.questions = list(self.questions)


@register(
    "invoices", InvoicePagesOptions, check_invoice_pages, "multi-page invoices (2-4 pages): total page, total"
)
def make_invoice_pages(rng: np.random.Generator, opts: InvoicePagesOptions) -> Draft:
    n = int(rng.integers(opts.min_pages, opts.max_pages + 1))
    terms_page = rng.random() < 0.4  # a last page of terms: the total is then on the page before
    n_item_pages = n - 1 if terms_page else n
    items = [  # each page's lines drawn apart (a service may be billed again on a later page)
        it | {"page": p}
        for p in range(n_item_pages)
        for it in _lines(rng, SERVICES + GOODS, int(rng.integers(4, 12)))
    ]
    rate = Decimal(_rnd(rng, ("0", "10", "19", "20", "8.5")))
    money = _totals(items, rate)
    cur = _rnd(rng, ("$", "€", "£"))
    fields = {"company": _rnd(rng, COMPANIES), "client": _name(rng), "date": _date(rng),
              "number": f"INV-{int(rng.integers(2015, 2026))}-{int(rng.integers(1, 9999)):04d}"}  # fmt: skip
    base = "serif" if rng.random() < 0.4 else "sans"
    size = int(rng.integers(13, 17))
    reg, bold = fonts.pick(rng, base), fonts.pick(rng, base + "_bold")
    f, fb = fonts.truetype(reg, size), fonts.truetype(bold, size)
    W = int(rng.integers(600, 720))
    H = int(W * 11 / 8.5)
    m, lh = 40, int(size * 1.6)
    accent = _rnd(rng, ((30, 60, 110), (120, 30, 40), (20, 100, 80), (60, 60, 60)))
    cols = [m, W - m - 330, W - m - 200, W - m]  # description | qty | unit | amount (right edges after first)
    pages = []
    total_page = n_item_pages - 1
    for p in range(n):
        cv, y = TextCanvas(W, H, (255, 255, 255)), m  # pages of one size (US letter's aspect)
        if p == 0:
            cv.text((m, y), fields["company"], fonts.truetype(bold, int(size * 1.4)), fill=accent)
            cv.text((W - m, y), "INVOICE", fonts.truetype(bold, int(size * 1.9)), fill=accent, anchor="ra")
            y += int(lh * 1.4)
            cv.text((m, y), f"{int(rng.integers(1, 300))} {_rnd(rng, STREETS)}, {_rnd(rng, CITIES)}", f,
                    fill=(80, 80, 80))  # fmt: skip
            y += int(lh * 1.8)
            cv.text((m, y), "Bill to:", fb)
            cv.text((W - m - 280, y), "Invoice No.:", fb)
            cv.text((W - m, y), fields["number"], f, anchor="ra")
            y += lh
            cv.text((m, y), fields["client"], f)
            cv.text((W - m - 280, y), "Date:", fb)
            cv.text((W - m, y), fields["date"], f, anchor="ra")
            y += int(lh * 1.8)
        else:
            cv.text((m, y), f"{fields['company']} - Invoice {fields['number']} (continued)", fb, fill=accent)
            y += int(lh * 1.8)
        if p < n_item_pages:
            cv.draw.rectangle([m, y, W - m, y + lh + 6], fill=accent)
            cv.text((m + 8, y + 4), "Description", fb, fill=(255, 255, 255))
            for x, h in zip(cols[1:], ("Qty", "Unit price", "Amount")):
                cv.text((x - 8, y + 4), h, fb, fill=(255, 255, 255), anchor="ra")
            y += lh + 10
            for it in (it for it in items if it["page"] == p):
                cv.text((m + 8, y), it["name"], f)
                values = (
                    str(it["qty"]),
                    _money(Decimal(it["unit"]), cur),
                    _money(Decimal(it["amount"]), cur),
                )
                for x, v in zip(cols[1:], values):
                    cv.text((x - 8, y), v, f, anchor="ra")
                y += lh
                cv.draw.line([m, y - 4, W - m, y - 4], fill=(215, 215, 215))
            if p < n_item_pages - 1:
                cv.text(
                    (W - m - 8, y + lh // 2), "continued on the next page", f, fill=(90, 90, 90), anchor="ra"
                )
        if p == total_page:
            y += lh // 2
            for label, key, font in (("Subtotal", "subtotal", f), (f"Tax ({money['tax_rate']}%)", "tax", f),
                                     ("Total due", "total", fb)):  # fmt: skip
                cv.text((W - m - 200, y), label, font, anchor="ra")
                cv.text((W - m - 8, y), _money(Decimal(money[key]), cur), font, anchor="ra")
                y += lh
        if p >= n_item_pages:  # the terms page
            cv.text((m, y), "Terms and conditions", fb)
            y += int(lh * 1.4)
            for k, para in enumerate(TERMS):
                for line in textwrap.wrap(
                    f"{k + 1}. {para}", width=max(40, int((W - 2 * m) / (size * 0.55)))
                ):
                    cv.text((m, y), line, f)
                    y += lh
                y += lh // 2
        cv.text((W / 2, H - m), f"Page {p + 1} of {n}", f, fill=(90, 90, 90), anchor="md")
        pages.append(cv)
    meta = {"doc_type": "invoice_pages", "fields": fields, "items": items, "money": money, "currency": cur,
            "n_pages": n}  # fmt: skip
    qtype = _rnd(rng, opts.questions)
    if qtype == "total_page":
        question, answer = "On which page is the total?", str(total_page + 1)
    else:
        question, answer = "What is the total?", _money(Decimal(money["total"]), cur)
    return Draft(
        image=pages[0].image,
        images=[cv.image for cv in pages],
        task="doc_qa",
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta={**meta, "question": {"qtype": qtype}},
        aux={"pages": [{"drawn": cv.drawn, "size": cv.image.size} for cv in pages]},
        ext=opts.ext,
    )
