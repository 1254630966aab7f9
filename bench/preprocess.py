"""Images/s of mmsmall's crops.preprocess_image vs transformers' Molmo2ImageProcessor, one core.

Both get the same decoded PIL images (a mix of sizes like a real pretraining + document mix);
every output is checked equal (pixels within 1e-5, identical pooling indices and grids).
Prints both rates, the ratio per size class and overall, and a line for bench/RESULTS.md.
Then the multi-image row: ``--docs`` documents of ``--pages`` pages each (document-sized pages)
through the whole processors, stock ``Molmo2Processor`` (a prompt with one ``<|image|>`` per page)
against ``Processor.encode_prompt(pages, question)``: token ids, pixels, pooling and grids equal.

    OMP_NUM_THREADS=1 .venv/bin/python bench/preprocess.py            # 200 images, default settings
    OMP_NUM_THREADS=1 .venv/bin/python bench/preprocess.py --setting tiny --n 100
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image

from mmsmall.config import ImageConfig
from mmsmall.export.molmo2 import molmo2_image_processor
from mmsmall.processing.crops import preprocess_image

SETTINGS = {
    "default": dict(crop_size=378, patch_size=14, max_crops=8, overlap_margins=(4, 4), pooling_size=(2, 2)),
    "tiny": dict(crop_size=112, patch_size=14, max_crops=4, overlap_margins=(1, 1), pooling_size=(2, 2)),
}

# size class -> (share of the images, (min_h, max_h), (min_w, max_w))
MIX = {
    "thumbnail": (0.10, (16, 200), (16, 200)),
    "web photo": (0.30, (320, 800), (320, 800)),
    "chart/screen": (0.20, (400, 1000), (600, 1400)),
    "document": (0.20, (1400, 2200), (1000, 1700)),
    "phone photo": (0.15, (1500, 3000), (2000, 4000)),
    "extreme aspect": (0.05, (20, 40), (1000, 1500)),
}


def make_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Smooth colour gradients plus noise (so resizing rounds like on real photos)."""
    yy = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    xx = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    base = np.stack([xx + 0 * yy, yy + 0 * xx, (xx + yy) / 2], -1)  # (h, w, 3)
    noise = rng.integers(-16, 17, (h, w, 1), dtype=np.int16)
    img = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def plan(n: int, seed: int) -> list[tuple[str, int, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for name, (share, (h0, h1), (w0, w1)) in MIX.items():
        for _ in range(max(1, round(share * n))):
            h, w = int(rng.integers(h0, h1 + 1)), int(rng.integers(w0, w1 + 1))
            if name == "extreme aspect" and rng.random() < 0.5:
                h, w = w, h
            out.append((name, h, w))
    rng.shuffle(out)
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    ap.add_argument("--docs", type=int, default=10, help="multi-image row: documents (0: skip the row)")
    ap.add_argument("--pages", type=int, default=3, help="multi-image row: pages per document")
    args = ap.parse_args()

    torch.set_num_threads(1)
    s = SETTINGS[args.setting]
    stock = molmo2_image_processor(ImageConfig(**s), max_crops=s["max_crops"])
    rng = np.random.default_rng(args.seed + 1)
    warm = make_image(rng, 300, 400)
    stock(warm, return_tensors="pt"), preprocess_image(warm, **s)  # warm-up both

    per_class: dict[str, list[float]] = {name: [0.0, 0.0, 0] for name in MIX}
    t_stock = t_ours = 0.0
    max_diff = 0.0
    items = plan(args.n, args.seed)
    for i, (name, h, w) in enumerate(items):
        im = make_image(rng, h, w)  # one at a time: 30 phone photos at once would need GBs
        order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate who runs first (cache / load fairness)
        times = [0.0, 0.0]
        results = [None, None]
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                results[0] = stock(im, return_tensors="pt")
            else:
                results[1] = preprocess_image(im, **s)
            times[which] = time.perf_counter() - t0
        ref, ours = results
        diff = (ours["pixel_values"] - ref["pixel_values"]).abs().max().item()
        same = (
            ours["pixel_values"].shape == ref["pixel_values"].shape
            and diff <= 1e-5
            and torch.equal(ours["image_token_pooling"], ref["image_token_pooling"].long())
            and torch.equal(ours["image_grids"], ref["image_grids"].long())
        )
        if not same:
            raise SystemExit(f"MISMATCH on image {i} ({name}, {h}x{w}): max abs diff {diff}")
        max_diff = max(max_diff, diff)
        t_stock += times[0]
        t_ours += times[1]
        c = per_class[name]
        c[0] += times[0]
        c[1] += times[1]
        c[2] += 1

    print(
        f"{len(items)} images, setting {args.setting} ({s}), 1 thread, all outputs equal (max |diff| {max_diff:.1e})"
    )
    print(f"{'class':<16}{'n':>4}{'stock img/s':>14}{'ours img/s':>13}{'ratio':>8}")
    for name, (ts, to, n) in per_class.items():
        if n:
            print(f"{name:<16}{n:>4}{n / ts:>14.1f}{n / to:>13.1f}{ts / to:>7.2f}x")
    n = len(items)
    print(f"{'all':<16}{n:>4}{n / t_stock:>14.1f}{n / t_ours:>13.1f}{t_stock / t_ours:>7.2f}x")
    cpu = platform.processor() or platform.machine()
    print(
        f"| preprocess ({args.setting}, {n} mixed images, 1 thread, {cpu}) | Molmo2ImageProcessor "
        f"{n / t_stock:.1f} img/s | mmsmall {n / t_ours:.1f} img/s | {t_stock / t_ours:.2f}x | outputs equal |"
    )
    if args.docs:
        multi_image_row(args, s, rng, cpu)


def multi_image_row(args, s: dict, rng: np.random.Generator, cpu: str) -> None:
    """Whole processors on documents of several pages: stock Molmo2Processor vs ours, outputs equal."""
    from transformers.models.molmo2.processing_molmo2 import Molmo2Processor
    from transformers.models.molmo2.video_processing_molmo2 import Molmo2VideoProcessor

    from mmsmall.config import TokenizerConfig
    from mmsmall.processing.processor import Processor
    from mmsmall.processing.tokenizer import build_tokenizer
    from mmsmall.processing.tokens import user_text

    tok = build_tokenizer(TokenizerConfig())
    cfg = ImageConfig(**{**s, "max_crops_eval": s["max_crops"]})
    stock = Molmo2Processor(image_processor=molmo2_image_processor(cfg), video_processor=Molmo2VideoProcessor(),
                            tokenizer=tok)  # fmt: skip
    ours = Processor(tok, cfg)
    question = "On which page is the total?"
    text = "<|image|>" * args.pages + user_text(question)
    (_, (h0, h1), (w0, w1)) = MIX["document"]
    t_stock = t_ours = 0.0
    for d in range(args.docs):
        pages = [
            make_image(rng, int(rng.integers(h0, h1 + 1)), int(rng.integers(w0, w1 + 1)))
            for _ in range(args.pages)
        ]
        order = (0, 1) if d % 2 == 0 else (1, 0)
        out = [None, None]
        for which in order:
            t0 = time.perf_counter()
            out[which] = (stock(images=pages, text=text, return_tensors="pt") if which == 0
                          else ours.encode_prompt(pages, question))  # fmt: skip
            dt = time.perf_counter() - t0
            if which == 0:
                t_stock += dt
            else:
                t_ours += dt
        ref, mine = out
        same = (
            mine["input_ids"].tolist() == ref["input_ids"][0].tolist()
            and (mine["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-5
            and torch.equal(mine["image_token_pooling"], ref["image_token_pooling"].long())
            and torch.equal(mine["image_grids"], ref["image_grids"].long())
        )
        if not same:
            raise SystemExit(f"MISMATCH on document {d} ({args.pages} pages)")
    n = args.docs
    print(f"{n} documents x {args.pages} pages: stock Molmo2Processor {n / t_stock:.2f} docs/s, "
          f"mmsmall Processor {n / t_ours:.2f} docs/s, {t_stock / t_ours:.2f}x, outputs equal")  # fmt: skip
    print(
        f"| preprocess multi-image ({args.setting}, {n} documents x {args.pages} pages, 1 thread, {cpu}) | "
        f"Molmo2Processor {n / t_stock:.2f} docs/s | mmsmall {n / t_ours:.2f} docs/s | {t_stock / t_ours:.2f}x | "
        "outputs equal |"
    )


if __name__ == "__main__":
    main()
