"""Decode-and-validate and normalize: bytes in, a checked RGB image (or a drop reason) out.

Reason codes: ``zero_byte``, ``file_too_large``, ``not_image``, ``decompression_bomb`` (from the
header, before any pixel is decoded), ``animated``, ``too_small``, ``aspect``, ``truncated``,
``unreadable``.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from mmsmall.processing.images import to_rgb_image

from .config import NormalizeConfig, ValidateConfig

ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_validate(
    data: bytes, cfg: ValidateConfig, draft: tuple[int, int] | None = None
) -> tuple[Image.Image | None, str | None, str]:
    """Open ``data``, check it from the header, then decode every byte.

    ``draft=(w, h)``: an upright RGB JPEG may be decoded at a reduced DCT scale no smaller than
    ``(w, h)`` (all entropy-coded data is still read, so truncation is still caught); the full
    size stays in ``image.info["full_size"]``. Returns ``(image, None, fmt)`` for a good image
    (not yet normalized) or ``(None, reason, detail)``.
    """
    if not data:
        return None, "zero_byte", "0 bytes"
    if len(data) > cfg.max_bytes:
        return None, "file_too_large", f"{len(data)} bytes > validate.max_bytes={cfg.max_bytes}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError as e:
            return None, "decompression_bomb", str(e)[:120]
        except UnidentifiedImageError:
            return None, "not_image", "not a known image format"
        except Exception as e:  # noqa: BLE001 - any header failure is a bad sample, never a crash
            return None, "unreadable", f"{type(e).__name__}: {str(e)[:100]}"
        w, h = im.size
        if w * h > cfg.max_pixels:
            return None, "decompression_bomb", f"{w}x{h} > validate.max_pixels={cfg.max_pixels}"
        if not cfg.allow_animated and getattr(im, "n_frames", 1) > 1:
            return None, "animated", f"{im.n_frames} frames"
        if min(w, h) < cfg.min_side:
            return None, "too_small", f"{w}x{h}, min side < validate.min_side={cfg.min_side}"
        if max(w, h) / max(min(w, h), 1) > cfg.max_aspect:
            return None, "aspect", f"{w}x{h}, aspect > validate.max_aspect={cfg.max_aspect}"
        fmt = im.format or ""
        im.info["full_size"] = (w, h)
        if draft and fmt == "JPEG" and im.mode == "RGB" and im.getexif().get(0x0112, 1) == 1:
            im.draft("RGB", draft)
        try:
            im.load()
        except Exception as e:  # noqa: BLE001
            msg = str(e)
            reason = "truncated" if "truncat" in msg.lower() or isinstance(e, EOFError) else "unreadable"
            return None, reason, f"{type(e).__name__}: {msg[:100]}"
    return im, None, fmt


def normalize_image(
    im: Image.Image, data: bytes, fmt: str, cfg: NormalizeConfig
) -> tuple[Image.Image, bytes, str, tuple[int, int]]:
    """EXIF transpose, RGB, optional max-side resize; re-encode only when something changed.

    Returns ``(rgb_image, image_bytes, ext, (width, height))``: ext is ``jpg`` or ``png`` and the
    size is that of ``image_bytes`` (``rgb_image`` may be a reduced draft decode of them).
    """
    src_ext = "jpg" if fmt == "JPEG" else "png"
    ext = src_ext if cfg.format == "keep" else cfg.format
    full = im.info.get("full_size", im.size)
    if full != im.size:  # a draft decode: enough when nothing changes, else decode in full
        if ext == src_ext and not (cfg.max_side and max(full) > cfg.max_side):
            return im, data, ext, full
        im = Image.open(io.BytesIO(data))
        im.load()
    changed = False
    out = ImageOps.exif_transpose(im)
    if out is not im:
        changed = True
    if out.mode != "RGB":
        out = to_rgb_image(out)  # 16-bit, float, alpha, palette, CMYK ... with the value range kept
        changed = True
    if cfg.max_side and max(out.size) > cfg.max_side:
        scale = cfg.max_side / max(out.size)
        size = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        out = out.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        changed = True
    if not changed and ext == src_ext and fmt in ("JPEG", "PNG"):
        return out, data, ext, out.size
    buf = io.BytesIO()
    if ext == "jpg":
        out.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    else:
        out.save(buf, format="PNG")
    return out, buf.getvalue(), ext, out.size
