"""``chat``: one question about one image; ``predict``: a folder of images or a shard set, with points drawn.

``model`` may be any folder :func:`mmsmall.export.consolidate.load_vlm` reads: a saved VLM, an
mmsmall or stock-Molmo2 export, a checkpoint or a training run.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_QUESTION = "Describe this image."


def _predictor(model: str, device: str = "cpu", max_crops: int | None = None, dtype: str = "fp32"):
    from mmsmall.export.consolidate import load_vlm
    from mmsmall.model.predict import Predictor

    vlm, _ = load_vlm(model)
    return Predictor(vlm, device=device, max_crops=max_crops, dtype=dtype)


def _open_image(path: str | Path) -> Image.Image:
    """The image fully decoded, or ``ImageLoadError`` (a one-line user error) for zero-byte, truncated,
    unreadable or bomb files: the same loader as training and eval."""
    from mmsmall.processing.crops import load_image

    return load_image(path)


def chat(
    model: str,
    image: str | None,
    question: str,
    max_new_tokens: int = 64,
    task: str | None = None,
    device: str = "cpu",
    max_crops: int | None = None,
    dtype: str = "fp32",
) -> str:
    """Answer ``question`` about ``image`` (None: text only) with greedy decoding."""
    predictor = _predictor(model, device=device, max_crops=max_crops, dtype=dtype)
    img = _open_image(image) if image else None
    return predictor.predict([img], [question], max_new_tokens=max_new_tokens, task=task)[0]


def draw_points(
    image: Image.Image, points: list[tuple[float, float]], radius: int | None = None
) -> Image.Image:
    """A copy of ``image`` with a ring at each (x, y) pixel point."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    r = radius or max(3, round(min(out.size) * 0.02))
    for x, y in points:
        draw.ellipse((x - r, y - r, x + r, y + r), outline=(255, 0, 0), width=max(1, r // 2))
        draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(255, 255, 255))
    return out


def answer_record(key: str, image: Image.Image | None, question: str, answer: str, out_dir: Path) -> dict:
    """The jsonl record of one answer; when it holds points, ``out_dir/{key}.png`` gets them drawn."""
    from mmsmall.processing.points import parse_points

    points = parse_points(answer, *image.size) if image is not None else []
    record = {"key": key, "question": question, "answer": answer, "points": [list(p) for p in points]}
    if points:
        png = out_dir / f"{key}.png"
        draw_points(image, points).save(png)
        record["drawn"] = png.name
    return record


def _iter_inputs(inputs: str, question: str | None) -> Iterator[tuple[str, Image.Image | None, str]]:
    """(key, image, question) from a folder of images or a shard set (its first user turn)."""
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
            yield f.stem, image, question or DEFAULT_QUESTION
        if len(skipped) == len(images):
            raise FileNotFoundError(
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
        yield sample["key"], sample["image"], q
    if counters:
        log.warning("predict: skipped corrupt shard members: %s", counters)
    if n == 0:
        raise FileNotFoundError(
            f"{inputs}: no images ({', '.join(IMAGE_SUFFIXES)}) and no readable shard samples"
        )


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
    ``out/predictions.jsonl`` and, for answers that contain points, ``out/{key}.png`` with the
    points drawn. Returns the jsonl path."""
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
                [im for _, im, _ in chunk], [q for _, _, q in chunk], max_new_tokens=max_new_tokens, task=task
            )
            for (key, im, q), answer in zip(chunk, answers):
                record = answer_record(key, im, q, answer, out_dir)
                n_drawn += "drawn" in record
                f.write(json.dumps(record) + "\n")
            bar.update(len(chunk))
    log.info("predict: %d answers (%d with points drawn) in %s", len(items), n_drawn, jsonl)
    return jsonl
