"""Synthetic raw inputs for tests, benchmarks and demos (no downloads).

``natural_image(seed, size)`` draws a smooth random picture (low-frequency noise plus shapes), so
distinct seeds give perceptual hashes far apart while re-encoded / resized / slightly cropped
copies stay close. ``build_bad_inputs(root)`` writes one of every bad input curation must catch.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def natural_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A deterministic smooth RGB picture of ``size`` (w, h)."""
    rng = np.random.default_rng(seed)
    low = (rng.random((6, 8, 3)) * 255).astype(np.uint8)  # (6, 8, 3) coarse colour field
    im = Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(im)
    w, h = size
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 3)), y0 + int(rng.integers(h // 8, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=colour)
    return im


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def near_copies(im: Image.Image) -> dict[str, bytes]:
    """The three near-duplicate kinds: JPEG quality 60, half size, and a crop removing 3% of the
    width and height (1.5% on each side; pHash drifts past 8 bits for larger crops)."""
    w, h = im.size
    cw, ch = round(w * 0.015), round(h * 0.015)
    return {
        "q60": encode(im, quality=60),
        "half": encode(im.resize((w // 2, h // 2), Image.Resampling.BILINEAR), quality=90),
        "crop3": encode(im.crop((cw, ch, w - cw, h - ch)), quality=90),
    }


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` (a decompression bomb by header)."""
    raw = zlib.compress(b"\x00" + b"\x00" * 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [natural_image(900 + i, (96, 96)).convert("P") for i in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg(seed: int) -> bytes:
    """A 200x120 JPEG with EXIF orientation 6 (display rotated: 120x200)."""
    im = natural_image(seed, (200, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, quality=90, exif=exif.tobytes())


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PLANTED_QUESTION = "What is the date mentioned at the top of the letter?"


def build_curation_fixture(root: str | Path, n_good: int = 10) -> tuple[dict, dict]:
    """Write a raw-input fixture with every bad input curation must catch.

    Returns ``(config_dict, expected)``: a curate config (folder + webdataset + points inputs,
    ChartQA and DocVQA benchmarks) and ``expected = {"n_in", "dropped": {reason: n}, "good_ids",
    "near_ids", "planted_image_id", "planted_question_id"}``.
    """
    root = Path(root)
    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def put(name: str, data: bytes, caption: str, **extra) -> None:
        (img / name).write_bytes(data)
        rows.append({"id": Path(name).stem, "image": name, "caption": caption, **extra})

    good_ids = []
    for i in range(n_good):
        put(
            f"good_{i}.jpg",
            encode(natural_image(i), quality=92),
            f"A colourful scene number {i} with shapes and a soft sky.",
        )
        good_ids.append(f"good_{i}")
    base = natural_image(0)
    for kind, data in near_copies(base).items():
        put(f"near_{kind}.jpg", data, f"The same scene again, stored as {kind}.")
    put("exact_copy.jpg", (img / "good_1.jpg").read_bytes(), "An exact copy of scene one.")
    put("zero.jpg", b"", "zero bytes")
    full = encode(natural_image(50), quality=92)
    put("truncated.jpg", full[: len(full) // 2], "A truncated file.")
    put("text.jpg", b"this is not an image at all, just text", "Not an image.")
    put("small.jpg", encode(natural_image(51, (16, 16))), "A tiny image.")
    put("wide.jpg", encode(natural_image(52, (800, 100))), "A very wide image.")
    put("bomb.png", png_with_header_size(50_000, 2_000), "A decompression bomb.")
    put("animated.gif", animated_gif(), "An animated picture.")
    rows.append({"id": "missing", "image": "does_not_exist.jpg", "caption": "A missing file."})
    put("empty_caption.jpg", encode(natural_image(60)), "")
    put("boiler.jpg", encode(natural_image(61)), "Stock photo of a scene, click here to buy now.")
    put("repeat.jpg", encode(natural_image(62)), "buy now buy now buy now buy now buy now buy now buy now")
    put("rotated.jpg", exif_rotated_jpeg(63), "A rotated photo of shapes.")
    put("rgba.png", encode(natural_image(64).convert("RGBA"), "PNG"), "A picture with an alpha channel.")
    bench_img = natural_image(100)
    put("planted_bench.jpg", encode(bench_img, quality=85), "A chart that also sits in the test set.")
    put("planted_q.jpg", encode(natural_image(65)), "", question=PLANTED_QUESTION, answer="March 3, 1999")
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")

    # webdataset shard with hostile member names
    wds = root / "wds"
    wds.mkdir(exist_ok=True)
    with tarfile.open(wds / "in-000000.tar", "w") as tar:
        for name, seed in (("ok_a", 30), ("../evil", 31), ("/abs/path/x", 32)):
            meta = {"id": name, "task": "caption", "messages": [
                {"role": "user", "content": "Describe this image."},
                {"role": "assistant", "content": f"A shard picture from seed {seed} with round shapes."}]}  # fmt: skip
            add_member(tar, f"{name}.jpg", encode(natural_image(seed)))
            add_member(tar, f"{name}.json", json.dumps(meta).encode())
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        add_member(tar, "noimage.json", json.dumps({"id": "noimage"}).encode())

    # PixMo-Points style annotations, pixel coordinates
    pts = root / "points"
    pts.mkdir(exist_ok=True)
    for i in range(3):
        (pts / f"pt_{i}.jpg").write_bytes(encode(natural_image(40 + i)))
    write_jsonl(root / "points.jsonl", [
        {"image": "points/pt_0.jpg", "label": "mug", "points": [{"x": 100, "y": 50}], "width": 320, "height": 240},
        {"image": "points/pt_0.jpg", "label": "cat", "points": []},
        {"image": "points/pt_1.jpg", "label": "dog", "points": [{"x": 400, "y": 50}]},
        {"image": "points/pt_2.jpg", "label": "", "points": [{"x": 10, "y": 10}]},
    ])  # fmt: skip

    # benchmarks: ChartQA layout (test/test_human.json + test/png) and DocVQA RRC json
    chart = root / "bench" / "chartqa" / "test"
    (chart / "png").mkdir(parents=True, exist_ok=True)
    (chart / "png" / "c0.png").write_bytes(encode(bench_img, "PNG"))
    (chart / "test_human.json").write_text(
        json.dumps([{"imgname": "c0.png", "query": "What is the peak value?", "label": "5"}])
    )
    doc = root / "bench" / "docvqa"
    (doc / "documents").mkdir(parents=True, exist_ok=True)
    (doc / "documents" / "d0.png").write_bytes(encode(natural_image(101), "PNG"))
    (doc / "val_v1.0.json").write_text(json.dumps({"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0",
        "data": [{"questionId": 7, "question": PLANTED_QUESTION, "image": "documents/d0.png", "docId": 1, "answers": ["x"]}]}))  # fmt: skip

    cfg = {
        "name": "fixture",
        "inputs": [
            {"kind": "folder", "path": str(img), "captions": str(captions), "name": "raw"},
            {"kind": "webdataset", "path": str(wds), "name": "wds"},
            {"kind": "points", "path": str(root / "points.jsonl"), "coords": "pixels", "name": "pts"},
        ],
        "out_dir": str(root / "out"),
        "shard_size": 8,
        "unit_size": 8,
        "validate": {"min_side": 32, "max_aspect": 4.0, "max_pixels": 50_000_000},
        "dedup": {"max_distance": 8},
        "decontam": {
            "benchmarks": [{"path": str(chart / "test_human.json")}, {"path": str(doc / "val_v1.0.json")}]
        },
    }
    dropped = {
        "near_duplicate": 3, "exact_duplicate": 1, "zero_byte": 1, "truncated": 1, "not_image": 1, "too_small": 1,
        "aspect": 1, "decompression_bomb": 1, "animated": 1, "missing_image": 2, "bad_annotation": 1,
        "text_empty": 1, "text_boilerplate": 1, "text_repetitive": 1, "decontam_image": 1, "decontam_text": 1,
        "unsafe_member": 1, "point_outside": 1, "point_label_empty": 1,
    }  # fmt: skip
    n_in = len(rows) + 1 + 5 + 3  # caption rows + bad line, shard samples, point images
    expected = {"n_in": n_in, "dropped": dropped, "n_kept": n_in - sum(dropped.values()), "good_ids": good_ids,
                "planted_image_id": "planted_bench", "planted_question_id": "planted_q"}  # fmt: skip
    return cfg, expected
