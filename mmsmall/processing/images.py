"""Any PIL image as upright 8-bit RGB, with the value range of high-depth modes kept.

Light on purpose (PIL and numpy only): curation workers, the shard reader, chat and eval share it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

_ORIENTATION = 0x0112  # EXIF tag


def to_rgb_image(image: Image.Image) -> Image.Image:
    """The PIL side of :func:`to_rgb_array` (returns ``image`` itself when it is already upright RGB)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image is empty ({image.width}x{image.height})")
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = high_depth_to_l(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    return image


def high_depth_to_l(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grayscale image as 8-bit ``L``, scaled rather than clipped.

    ``I;16*``: the full 16-bit range maps to 0-255. ``I`` (32-bit; Pillow's mode for many 16-bit
    files) and ``F``: the range the values fit in (0-255, 0-65535 for ``I``; 0-1, 0-255 for ``F``),
    else the image's own min-max; non-finite floats become 0.
    """
    a = np.asarray(image).astype(np.float64)  # (H, W)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if image.mode.startswith("I;16"):
        top: float | None = 65535.0
    else:
        ranges = (1.0, 255.0) if image.mode == "F" else (255.0, 65535.0)
        top = next((t for t in ranges if lo >= 0 and hi <= t), None)
    if top is None:  # values outside any standard range: stretch what is there
        a, top = a - lo, max(hi - lo, 1e-12)
    out = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")
