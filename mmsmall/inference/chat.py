"""``chat``: one question about one image; ``predict``: a folder of images or a shard set, with points drawn.

``model`` may be any folder :func:`mmsmall.export.load.load_vlm` reads: a saved VLM, an
mmsmall or stock-Molmo2 export, a checkpoint or a training run.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from mmsmall.errors import MissingInput

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_QUESTION = "Describe this image."


def _predictor(model: str, device: str = "cpu", max_crops: int | None = None, dtype: str = "fp32"):
    from mmsmall.inference.predictor import Predictor

    return Predictor(model, device=device, max_crops=max_crops, dtype=dtype)  # it loads the folder


def _open_image(path: str | Path) -> Image.Image:
    """The image fully decoded, or ``ImageLoadError`` (a one-line user error) for zero-byte, truncated,
    unreadable or bomb files: the same loader as training and eval."""
    from mmsmall.processing.crops import load_image

    return load_image(path)


def chat(
    model: str,
    image: str | Sequence[str] | None,
    question: str,
    max_new_tokens: int = 64,
    task: str | None = None,
    device: str = "cpu",
    max_crops: int | None = None,
    dtype: str = "fp32",
) -> str:
    """Answer ``question`` about ``image`` (a path, an ordered list of paths asked about together,
    or None: text only) with greedy decoding."""
    from mmsmall.inference.predictor import check_options

    check_options(max_new_tokens=max_new_tokens, max_crops=max_crops)
    predictor = _predictor(model, device=device, max_crops=max_crops, dtype=dtype)
    paths = [image] if isinstance(image, (str, Path)) else list(image or [])
    images = [_open_image(p) for p in paths]
    img = images[0] if len(images) == 1 else (images or None)
    return predictor.predict([img], [question], max_new_tokens=max_new_tokens, task=task)[0]


PRED_COLOR, GOLD_COLOR, HALO = (0, 90, 255), (0, 170, 60), (255, 255, 255)


def draw_points(
    image: Image.Image,
    points: list[tuple[float, float]],
    radius: int | None = None,
    gold: list[tuple[float, float]] | None = None,
    caption: list[str] | None = None,
    min_side: int = 448,
) -> Image.Image:
    """A viewable copy of ``image`` with each predicted (x, y) pixel point as a blue ring.

    The image is enlarged to at least ``min_side`` pixels on its short side (a 112 px scene is too
    small to read); ``gold`` points are green crosses; ``caption`` lines (question, parsed answer)
    are written in a band under the image with a legend.
    """
    im = image.convert("RGB")
    scale = max(1.0, min_side / min(im.size))
    if scale > 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    font = _font(max(12, round(min(im.size) * 0.035)))
    line_h = round(font.size * 1.35)
    lines = [*(caption or []), "blue ring = predicted" + (", green cross = gold" if gold is not None else "")]
    out = Image.new("RGB", (im.width, im.height + line_h * len(lines) + 8), (255, 255, 255))
    out.paste(im, (0, 0))
    draw = ImageDraw.Draw(out)
    r = radius or max(5, round(min(im.size) * 0.03))
    w = max(2, r // 3)
    for x, y in gold or []:  # white under each mark, so it shows on any colour
        x, y = x * scale, y * scale
        for color, width in ((HALO, w + 2), (GOLD_COLOR, w)):
            draw.line((x - r, y - r, x + r, y + r), fill=color, width=width)
            draw.line((x - r, y + r, x + r, y - r), fill=color, width=width)
    for x, y in points:
        x, y = x * scale, y * scale
        draw.ellipse((x - r - 1, y - r - 1, x + r + 1, y + r + 1), outline=HALO, width=w + 2)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=PRED_COLOR, width=w)
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=PRED_COLOR)
    for n, text in enumerate(lines):
        draw.text((6, im.height + 4 + n * line_h), text, fill=(0, 0, 0), font=font)
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def answer_record(
    key: str,
    image: Image.Image | list[Image.Image] | None,
    question: str,
    answer: str,
    out_dir: Path,
    gold: list[tuple[float, float]] | None = None,
) -> dict:
    """The jsonl record of one answer; when it holds points (or gold points are known),
    ``out_dir/{key}.png`` shows them with the question and the parsed answer."""
    from mmsmall.processing.points import read_points

    if isinstance(image, list):  # a several-image sample (a document's pages): the answer, no drawing
        return {"key": key, "question": question, "answer": answer, "images": len(image)}
    points, outside = read_points(answer, *image.size) if image is not None else ([], 0)
    record = {"key": key, "question": question, "answer": answer, "points": [list(p) for p in points]}
    if outside:
        record["points_outside"] = outside
    if image is not None and (points or gold):
        png = out_dir / f"{key}.png"
        parsed = ", ".join(f"({100 * x / image.width:.1f}, {100 * y / image.height:.1f})" for x, y in points)
        caption = [
            f"Q: {question}",
            f"parsed: {parsed or 'no points'}" + (f"; {outside} off the image" if outside else ""),
        ]
        draw_points(image, points, gold=gold, caption=caption).save(png)
        record["drawn"] = png.name
    return record


def _gold_points(meta: dict, image: Image.Image) -> list[tuple[float, float]] | None:
    """A pointing sample's gold points in pixels (its ``points`` field), or None for other tasks."""
    if meta.get("task") != "pointing" or isinstance(image, list):
        return None
    return [(x * image.width, y * image.height) for g in meta.get("points", []) for x, y in g["xy"]]


def _iter_inputs(
    inputs: str, question: str | None
) -> Iterator[tuple[str, Image.Image | None, str, list[tuple[float, float]] | None]]:
    """(key, image, question, gold points) from a folder of images or a shard set (its first user turn).

    The key is the image's file name with its extension (``cat.png`` and ``cat.jpg`` are two rows),
    or the shard sample's key."""
    p = Path(inputs)
    images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else []
    if images:
        from mmsmall.processing.crops import ImageLoadError

        skipped = []
        for f in images:
            try:
                image = _open_image(f)
            except ImageLoadError as e:  # skip and count; every good image is still answered
                skipped.append((f.name, str(e)))
                continue
            yield f.name, image, question or DEFAULT_QUESTION, None  # cat.png and cat.jpg: two keys
        if len(skipped) == len(images):
            raise MissingInput(
                f"{inputs}: none of its {len(images)} images could be read, e.g. {skipped[0][1]}"
            )
        if skipped:
            names = ", ".join(name for name, _ in skipped[:10])
            log.warning(
                "predict: skipped %d unreadable image(s): %s (first: %s)", len(skipped), names, skipped[0][1]
            )
        return
    from mmsmall.data.shards import iter_samples

    counters: dict[str, int] = {}
    n = 0
    for sample in iter_samples(inputs, counters=counters):
        msgs = sample["json"].get("messages") or []
        q = question or next((m["content"] for m in msgs if m.get("role") == "user"), DEFAULT_QUESTION)
        n += 1
        gold = _gold_points(sample["json"], sample["image"]) if question is None else None
        yield sample["key"], sample["image"], q, gold
    if counters:
        log.warning("predict: skipped corrupt shard members: %s", counters)
    if n == 0:
        raise MissingInput(f"{inputs}: no images ({', '.join(IMAGE_SUFFIXES)}) and no readable shard samples")


def predict(
    model: str,
    inputs: str,
    out: str,
    question: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    task: str | None = None,
    device: str = "cpu",
    limit: int | None = None,
    max_crops: int | None = None,
    dtype: str = "fp32",
) -> Path:
    """Answer a question for every image of ``inputs`` (the first ``limit`` when given); writes
    ``out/predictions.jsonl`` (one row per image, keyed by its file name or shard key) and, for
    answers that contain points, ``out/{key}.png`` with the
    points drawn. Returns the jsonl path."""
    from mmsmall.inference.predictor import check_options

    check_options(max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, max_crops=max_crops)
    predictor = _predictor(model, device=device, max_crops=max_crops, dtype=dtype)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "predictions.jsonl"
    items = list(itertools.islice(_iter_inputs(inputs, question), limit))
    n_drawn = 0
    with open(jsonl, "w") as f, tqdm(total=len(items), desc="predict", unit="img") as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            answers = predictor.predict(
                [im for _, im, _, _ in chunk], [q for _, _, q, _ in chunk], max_new_tokens=max_new_tokens,
                task=task,
            )  # fmt: skip
            for (key, im, q, gold), answer in zip(chunk, answers):
                record = answer_record(key, im, q, answer, out_dir, gold=gold)
                n_drawn += "drawn" in record
                f.write(json.dumps(record) + "\n")
            bar.update(len(chunk))
    log.info("predict: %d answers (%d with points drawn) in %s", len(items), n_drawn, jsonl)
    return jsonl
