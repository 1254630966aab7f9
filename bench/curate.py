"""Curation throughput, printed next to the targets as ratios (not a test; runs in < 5 min).

    OMP_NUM_THREADS=1 .venv/bin/python bench/curate.py [--images 2000] [--hashes 1000000]

1. cheap per-sample stages in one process: decode + validate + normalize + sha256 + pHash + text
   filters on generated 640x480 JPEGs (target >= 400 images/s/core);
2. near-dup multi-index at 1M random 64-bit hashes: build time, self-join time, and query rate
   (target >= 10,000 queries/s);
3. CLIP scoring images/s on CPU with one thread, tiny random model and a ViT-B/32-sized random model.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_tools.config import ClipConfig, NormalizeConfig, TextConfig, ValidateConfig  # noqa: E402
from data_tools.dedup import NearDupIndex, phash_batch, phash_thumb  # noqa: E402
from data_tools.fixtures import encode, natural_image  # noqa: E402
from data_tools.textfilters import text_filter  # noqa: E402
from data_tools.validate import decode_validate, normalize_image  # noqa: E402


def _row(name: str, value: float, unit: str, target: float | None = None) -> None:
    ratio = f"{value / target:6.2f}x target ({target:,.0f})" if target else ""
    print(f"  {name:<44} {value:>12,.1f} {unit:<12} {ratio}")


def bench_cheap(n: int) -> None:
    print(f"cheap stages, one process, {n} JPEGs 640x480 (quality 90)")
    rng = np.random.default_rng(0)
    base = [natural_image(s, (640, 480)) for s in range(64)]
    jpegs = []
    for i in range(n):  # cheap variety: a base picture with a random block of noise
        im = base[i % 64].copy()
        x, y = (int(v) for v in rng.integers(0, 560, 2))
        im.paste(Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)), (x, y % 440))
        jpegs.append(encode(im, quality=90))
    msgs = [{"role": "user", "content": "Describe this image."},
            {"role": "assistant", "content": "A red square and a blue circle over a soft green background, seen from above."}]  # fmt: skip
    vcfg, ncfg, tcfg = ValidateConfig(), NormalizeConfig(), TextConfig()
    t0 = time.perf_counter()
    thumbs, kept = [], 0
    for data in jpegs:
        im, reason, fmt = decode_validate(data, vcfg, draft=(96, 96))  # as curation does without CLIP
        if reason is not None:
            continue
        im, out, _, _ = normalize_image(im, data, fmt, ncfg)
        hashlib.sha256(out).digest()
        thumbs.append(phash_thumb(im))
        kept += text_filter(msgs, tcfg)[0] is None
    phash_batch(np.stack(thumbs))
    dt = time.perf_counter() - t0
    _row("decode+validate+sha256+pHash+text", n / dt, "images/s", 400)
    assert kept == n


def bench_index(n: int, n_query: int) -> None:
    print(f"near-dup multi-index, {n:,} random 64-bit hashes, max_distance 4 and 6")
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    for k in (4, 6):
        t0 = time.perf_counter()
        idx = NearDupIndex(hashes, max_distance=k)
        build = time.perf_counter() - t0
        flips = np.uint64(0b1011)  # each query is a stored hash with 3 bits flipped: must be found
        queries = hashes[rng.integers(0, n, n_query)] ^ flips
        t0 = time.perf_counter()
        q, _, _ = idx.query(queries)
        dt = time.perf_counter() - t0
        assert len(np.unique(q)) == n_query, "a planted near match was missed"
        t0 = time.perf_counter()
        a, _ = idx.self_pairs()
        join = time.perf_counter() - t0
        print(
            f"  k={k}: {len(idx.tables)} tables, build {build:.1f} s, self-join {join:.1f} s ({len(a)} pairs)"
        )
        _row(f"queries at {n:,} (k={k})", n_query / dt, "queries/s", 10_000)


def bench_clip(n: int) -> None:
    import torch

    from data_tools.clipscore import TINY_CLIP, ClipScorer

    torch.set_num_threads(1)
    print(f"CLIP scoring, CPU, 1 thread, random init, {n} images 640x480")
    ims = [natural_image(s, (640, 480)) for s in range(n)]
    texts = [f"a picture of {s} shapes" for s in range(n)]
    for name, cfg in (
        (
            "tiny (32-wide, 1 layer)",
            ClipConfig(enabled=True, model="mmsmall-tiny-clip", custom=TINY_CLIP, batch_size=32),
        ),
        ("ViT-B-32 sized", ClipConfig(enabled=True, model="ViT-B-32", batch_size=32)),
    ):
        scorer = ClipScorer(cfg)
        scorer.score(ims[:4], texts[:4])  # warm-up
        t0 = time.perf_counter()
        scorer.score(ims, texts)
        _row(f"CLIP {name}", n / (time.perf_counter() - t0), "images/s")


def bench_clip_batched(n: int) -> None:
    """ClipScorer (batched, all threads) against a plain batch-1 open_clip loop of the same model."""
    import torch

    from data_tools.clipscore import ClipScorer

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"CLIP scoring, CPU, ViT-B-32 sized random init, {n} images 640x480: batch-1 loop vs ClipScorer")
    ims = [natural_image(s, (640, 480)) for s in range(n)]
    texts = [f"a picture of {s} shapes" for s in range(n)]
    scorer = ClipScorer(ClipConfig(enabled=True, model="ViT-B-32", batch_size=64, threads=threads))
    net, pre, tok = scorer.model, scorer.preprocess, scorer.tokenizer
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loop = []
    with torch.inference_mode():
        for im, t in zip(ims, texts):
            a = torch.nn.functional.normalize(net.encode_image(pre(im)[None]).float(), dim=-1)
            b = torch.nn.functional.normalize(net.encode_text(tok([t])).float(), dim=-1)
            loop.append(float((a * b).sum()))
    t_loop = time.perf_counter() - t0
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    batched = scorer.score(ims, texts)
    t_batch = time.perf_counter() - t0
    diff = max(abs(x - y) for x, y in zip(loop, batched))
    _row("batch-1 open_clip loop, 1 thread", n / t_loop, "images/s")
    _row(f"ClipScorer, batch 64, {threads} threads", n / t_batch, "images/s")
    print(f"  speed-up {t_loop / t_batch:.2f}x (target >= 3x); max |score difference| {diff:.1e}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--hashes", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=100_000)
    p.add_argument("--clip-images", type=int, default=64)
    a = p.parse_args()
    t0 = time.time()
    bench_cheap(a.images)
    bench_index(a.hashes, a.queries)
    bench_clip(a.clip_images)
    bench_clip_batched(a.clip_images)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
