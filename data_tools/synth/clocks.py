"""Analog and digital clock faces; the answer is the time as ``H:MM`` (12-hour, no leading zero).

Analog faces vary the face shape and colours, tick marks (none, 12, 60), numerals (none,
Arabic, Roman, quarters), hand shapes (bar, tapered, arrow), an optional sweeping second hand
and a centre cap. The minute hand sweeps with the seconds and the hour hand with the minutes,
as on a real clock. Digital faces are seven-segment displays (12- or 24-hour, optional
seconds, optional AM/PM, faint unlit segments). Drawing happens at 2x and is downsampled, so
edges are antialiased.

The check does not trust the chosen time: for analog faces it reads the hand angles back from
the stored hand tip coordinates, for digital faces it decodes the segments that were drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data_tools.synth import fonts
from data_tools.synth.checks import check_clock
from data_tools.synth.core import Draft, SynthError, register

# The demo's preset (task "clock"): analog faces on the hour with one long thick hour hand and no
# minute hand, "What time ...?" -> "3:00"; the check reads the hour back from the drawn hand like
# every other clock's (blind baseline ~8%, one hour in twelve).
EASY_CLOCK = dict(image_size=112, digital_rate=0.0, on_the_hour=True, hour_hand_only=True)
QUESTIONS = (
    "What time is shown on the clock?",
    "What time does the clock show?",
    "What time is it?",
    "Read the time on this clock.",
    "What is the time on the clock face?",
)
ROMAN = ("XII", "I", "II", "III", "IIII", "V", "VI", "VII", "VIII", "IX", "X", "XI")
# segments a..g (top, top-right, bottom-right, bottom, bottom-left, top-left, middle) per digit
SEGMENTS = {
    "0": "abcdef",
    "1": "bc",
    "2": "abdeg",
    "3": "abcdg",
    "4": "bcfg",
    "5": "acdfg",
    "6": "acdefg",
    "7": "abc",
    "8": "abcdefg",
    "9": "abcdfg",
}


@dataclass
class ClockOptions:
    image_size: int = 0  # output side in pixels (analog square; digital width); 0 = random
    digital_rate: float = 0.25  # share of digital faces
    ext: str = "png"
    on_the_hour: bool = False  # every time is H:00 (the minute hand at 12): read the hour only
    hour_hand_only: bool = False  # on the hour, draw one long thick hour hand and no other hand

    def validate(self) -> None:
        if self.image_size and not 64 <= self.image_size <= 2048:
            raise SynthError(
                f"synth clocks: image_size={self.image_size} must be 0 (random) or in [64, 2048]"
            )
        if not 0.0 <= self.digital_rate <= 1.0:
            raise SynthError(f"synth clocks: digital_rate={self.digital_rate} must be in [0, 1]")
        if self.ext not in ("png", "jpg"):
            raise SynthError(f"synth clocks: ext={self.ext!r}; valid: png, jpg")
        if self.hour_hand_only and not (self.on_the_hour and self.digital_rate == 0.0):
            raise SynthError(
                "synth clocks: hour_hand_only needs on_the_hour=true and digital_rate=0 (a face without"
                " a minute hand shows whole hours only)"
            )


def _rgb(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _hand_polygon(
    style: str, cx: float, cy: float, ang: float, length: float, width: float
) -> list[tuple[float, float]]:
    """Hand outline pointing at ``ang`` degrees clockwise from 12; tip at ``length``."""
    ux, uy = math.sin(math.radians(ang)), -math.cos(math.radians(ang))  # along the hand
    px, py = -uy, ux  # across the hand
    tail = 0.18 * length
    if style == "bar":
        prof = [(-tail, -width / 2), (length, -width / 2), (length, width / 2), (-tail, width / 2)]
    elif style == "tapered":
        prof = [(-tail, -width / 2), (length, -width * 0.08), (length, width * 0.08), (-tail, width / 2)]
    else:  # arrow
        head = 0.22 * length
        prof = [
            (-tail, -width / 3),
            (length - head, -width / 3),
            (length - head, -width),
            (length, 0.0),
            (length - head, width),
            (length - head, width / 3),
            (-tail, width / 3),
        ]
    return [(cx + a * ux + b * px, cy + a * uy + b * py) for a, b in prof]


def _analog(
    rng: np.random.Generator, size: int, h: int, m: int, s: int, hour_only: bool = False
) -> tuple[Image.Image, dict]:
    k = 2  # supersampling
    S = size * k
    bg = _rgb(rng, 150, 256)
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    cx = cy = S / 2
    R = S * rng.uniform(0.40, 0.47)
    face = _rgb(rng, 200, 256) if rng.random() < 0.8 else _rgb(rng, 20, 70)
    dark_face = sum(face) < 300
    ink = _rgb(rng, 200, 256) if dark_face else _rgb(rng, 0, 70)
    rim = _rgb(rng, 0, 256)
    rim_w = int(S * rng.uniform(0.005, 0.04))
    face_shape = "round" if rng.random() < 0.75 else "square"
    if face_shape == "round":
        d.ellipse([cx - R - rim_w, cy - R - rim_w, cx + R + rim_w, cy + R + rim_w], fill=rim)
        d.ellipse([cx - R, cy - R, cx + R, cy + R], fill=face)
    else:
        rad = int(R * rng.uniform(0.05, 0.3))
        d.rounded_rectangle(
            [cx - R - rim_w, cy - R - rim_w, cx + R + rim_w, cy + R + rim_w], rad + rim_w, fill=rim
        )
        d.rounded_rectangle([cx - R, cy - R, cx + R, cy + R], rad, fill=face)

    ticks = ("none", "12", "60")[int(rng.choice(3, p=[0.15, 0.35, 0.5]))]
    if ticks != "none":
        for i in range(60 if ticks == "60" else 12):
            major = ticks == "12" or i % 5 == 0
            ang = math.radians(i * (6 if ticks == "60" else 30))
            r0 = R * (0.86 if major else 0.92)
            w = max(1, int(S * (0.012 if major else 0.005)))
            x0, y0 = cx + r0 * math.sin(ang), cy - r0 * math.cos(ang)
            x1, y1 = cx + R * 0.97 * math.sin(ang), cy - R * 0.97 * math.cos(ang)
            d.line([(x0, y0), (x1, y1)], fill=ink, width=w)

    numerals = ("none", "arabic", "roman", "quarters")[int(rng.choice(4, p=[0.2, 0.45, 0.2, 0.15]))]
    if numerals != "none":
        font = fonts.truetype(
            fonts.pick(rng, ("sans", "serif", "sans_bold", "serif_bold")[int(rng.integers(4))]),
            int(R * rng.uniform(0.14, 0.2)),
        )
        for i in range(12):
            if numerals == "quarters" and i % 3:
                continue
            label = ROMAN[i] if numerals == "roman" else str(i or 12)
            ang = math.radians(i * 30)
            rr = R * 0.72
            d.text(
                (cx + rr * math.sin(ang), cy - rr * math.cos(ang)), label, fill=ink, font=font, anchor="mm"
            )

    if rng.random() < 0.3:
        brand = ("QUARTZ", "Atlas", "MERIDIAN", "Nordhall", "ACME", "Tempo")[int(rng.integers(6))]
        font = fonts.truetype(fonts.pick(rng, "sans"), int(R * 0.09))
        d.text((cx, cy - R * 0.35), brand, fill=ink, font=font, anchor="mm")

    style = ("bar", "tapered", "arrow")[int(rng.integers(3))]
    hand_color = ink if rng.random() < 0.7 else _rgb(rng, 0, 256)
    show_seconds = rng.random() < 0.5
    sec = s if show_seconds else 0
    minute_ang = 6.0 * m + 0.1 * sec  # degrees clockwise from 12
    hour_ang = 30.0 * (h % 12) + 0.5 * m + sec / 120.0
    hour_len, min_len = R * rng.uniform(0.45, 0.55), R * rng.uniform(0.72, 0.85)
    hands = {
        "hour": (hour_ang, hour_len, S * rng.uniform(0.03, 0.045)),
        "minute": (minute_ang, min_len, S * rng.uniform(0.018, 0.03)),
    }
    if hour_only:  # one long, thick bar: the hour reads from its direction alone
        style, show_seconds = "bar", False
        hands = {"hour": (hour_ang, R * 0.8, S * 0.075)}
    tips: dict[str, list[float]] = {}
    for name in hands:
        ang, length, width = hands[name]
        d.polygon(_hand_polygon(style, cx, cy, ang, length, width), fill=hand_color)
        tips[name] = [cx + length * math.sin(math.radians(ang)), cy - length * math.cos(math.radians(ang))]
    if show_seconds:
        sec_ang = 6.0 * s
        red = (200, 30, 30) if rng.random() < 0.7 else _rgb(rng, 0, 256)
        sl = R * 0.88
        tip = (cx + sl * math.sin(math.radians(sec_ang)), cy - sl * math.cos(math.radians(sec_ang)))
        back = (
            cx - 0.2 * sl * math.sin(math.radians(sec_ang)),
            cy + 0.2 * sl * math.cos(math.radians(sec_ang)),
        )
        d.line([back, tip], fill=red, width=max(1, int(S * 0.006)))
    cap = S * rng.uniform(0.015, 0.03)
    d.ellipse([cx - cap, cy - cap, cx + cap, cy + cap], fill=hand_color)

    out = img.resize((size, size), Image.Resampling.LANCZOS)
    # hand tips in output pixels
    meta = {
        "face": "analog",
        "face_shape": face_shape,
        "ticks": ticks,
        "numerals": numerals,
        "hand_style": style,
        "seconds_hand": show_seconds,
        "center": [cx / k, cy / k],
        "hour_tip": [round(v / k, 4) for v in tips["hour"]],
        "minute_tip": [round(v / k, 4) for v in tips["minute"]] if "minute" in tips else None,
    }
    return out, meta


def _segment_polys(x: float, y: float, w: float, h: float, t: float, skew: float) -> dict[str, list]:
    """Hexagonal segment outlines for one digit cell at (x, y) of size w x h, thickness t."""

    def hseg(x0, x1, yc):
        return [
            (x0, yc),
            (x0 + t / 2, yc - t / 2),
            (x1 - t / 2, yc - t / 2),
            (x1, yc),
            (x1 - t / 2, yc + t / 2),
            (x0 + t / 2, yc + t / 2),
        ]

    def vseg(xc, y0, y1):
        return [
            (xc, y0),
            (xc + t / 2, y0 + t / 2),
            (xc + t / 2, y1 - t / 2),
            (xc, y1),
            (xc - t / 2, y1 - t / 2),
            (xc - t / 2, y0 + t / 2),
        ]

    g = t * 0.15  # gap between segments
    mid = y + h / 2
    segs = {
        "a": hseg(x + g, x + w - g, y),
        "b": vseg(x + w, y + g, mid - g),
        "c": vseg(x + w, mid + g, y + h - g),
        "d": hseg(x + g, x + w - g, y + h),
        "e": vseg(x, mid + g, y + h - g),
        "f": vseg(x, y + g, mid - g),
        "g": hseg(x + g, x + w - g, mid),
    }
    return {k: [(px + skew * (mid - py), py) for px, py in v] for k, v in segs.items()}


def _digital(rng: np.random.Generator, width: int, h: int, m: int, s: int) -> tuple[Image.Image, dict]:
    k = 2
    h24 = h % 12 + (12 if rng.random() < 0.5 else 0)  # the same 12-hour time, morning or afternoon
    use24 = rng.random() < 0.4
    show_sec = rng.random() < 0.3
    hour_shown = h24 if use24 else (h24 % 12 or 12)
    hour_txt = f"{hour_shown:02d}" if (use24 or rng.random() < 0.5) else str(hour_shown)
    text = f"{hour_txt}:{m:02d}" + (f":{s:02d}" if show_sec else "")
    W = width * k
    H = int(W * rng.uniform(0.42, 0.6))
    body = _rgb(rng, 0, 90) if rng.random() < 0.7 else _rgb(rng, 160, 256)
    lit = ((255, 60, 40), (60, 255, 90), (80, 200, 255), (255, 190, 40), (240, 240, 240))[
        int(rng.integers(5))
    ]
    if sum(body) > 400:
        lit = _rgb(rng, 0, 60)
    ghost = tuple(int(0.92 * b + 0.08 * c) for b, c in zip(body, lit))
    img = Image.new("RGB", (W, H), _rgb(rng, 120, 256))
    d = ImageDraw.Draw(img)
    pad = W * 0.04
    d.rounded_rectangle([pad, pad, W - pad, H - pad], int(W * 0.04), fill=body)
    n_digits = sum(ch.isdigit() for ch in text)
    n_colons = text.count(":")
    inner = W - 4 * pad
    cell = inner / (n_digits + 0.45 * n_colons + 0.3 * (n_digits - 1))
    dw, dh = cell * 0.78, min(cell * 1.55, (H - 4 * pad) * 0.8)
    t = max(2.0, dw * 0.2)
    skew = 0.12 if rng.random() < 0.5 else 0.0
    x = 2 * pad  # the cells fill the inner width exactly
    y = (H - dh) / 2
    drawn: list[str] = []
    show_ghost = rng.random() < 0.6
    for ch in text:
        if ch == ":":
            r = t * 0.45
            for yy in (y + dh * 0.3, y + dh * 0.7):
                d.ellipse([x + cell * 0.2 - r, yy - r, x + cell * 0.2 + r, yy + r], fill=lit)
            x += 0.45 * cell
            continue
        polys = _segment_polys(x + t / 2, y, dw - t, dh, t, skew)
        on = SEGMENTS[ch] if ch.strip() else ""
        for name, poly in polys.items():
            if name in on:
                d.polygon(poly, fill=lit)
            elif show_ghost:
                d.polygon(poly, fill=ghost)
        drawn.append("".join(sorted(on)))
        x += cell * 1.3
    ampm = None
    if not use24 and rng.random() < 0.6:
        ampm = "PM" if h24 >= 12 else "AM"
        font = fonts.truetype(fonts.pick(rng, "sans_bold"), int(H * 0.09))
        d.text((W - 2.2 * pad, H - 2.2 * pad), ampm, fill=lit, font=font, anchor="rb")
    out = img.resize((width, int(H / k)), Image.Resampling.LANCZOS)
    meta = {
        "face": "digital",
        "display": text,
        "format": "24h" if use24 else "12h",
        "ampm": ampm,
        "segments": drawn,  # lit segments of each digit, left to right, as drawn
    }
    return out, meta


@register("clocks", ClockOptions, check_clock, "analog and digital clock faces; answer H:MM")
def make_clock(rng: np.random.Generator, opts: ClockOptions) -> Draft:
    h, m, s = int(rng.integers(1, 13)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    if opts.on_the_hour:
        m = s = 0
    digital = rng.random() < opts.digital_rate
    if digital:
        img, meta = _digital(rng, opts.image_size or int(rng.integers(256, 449)), h, m, s)
    else:
        img, meta = _analog(rng, opts.image_size or int(rng.integers(224, 449)), h, m, s, opts.hour_hand_only)
    question = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    answer = f"{h}:{m:02d}"
    meta["time"] = {"hour": h, "minute": m, "second": s}
    return Draft(
        image=img,
        task="clock",
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        meta=meta,
        ext=opts.ext,
    )
