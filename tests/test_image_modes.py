"""Every PIL mode becomes RGB with its value range kept: checked against the source's own values."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_tools.config import NormalizeConfig, ValidateConfig
from data_tools.validate import decode_validate, normalize_image
from mmsmall.processing.crops import to_rgb_array

H, W = 48, 64
_yy, _xx = np.mgrid[0:H, 0:W]
GRAY = 0.15 + 0.7 * (_xx / (W - 1)) * (0.5 + 0.5 * (_yy / (H - 1)))  # (H, W) shares in [0.15, 0.85]
ALPHA = np.where(_xx < W // 2, 1.0, 0.25)  # (H, W) left opaque, right mostly transparent
RGB = np.stack([GRAY, 1 - GRAY, np.full_like(GRAY, 0.4)], -1)  # (H, W, 3)


def _over_white(v: np.ndarray, a: np.ndarray) -> np.ndarray:
    return v * a + (1 - a)


def _palette_with_transparency() -> tuple[Image.Image, np.ndarray]:
    idx = np.rint(GRAY * 15).astype(np.uint8)  # 16 grey levels, index 15 transparent
    im = Image.fromarray(idx, "P")
    im.putpalette([c for i in range(16) for c in (i * 17,) * 3])
    im.info["transparency"] = 15
    expected = np.where(idx == 15, 1.0, idx * 17 / 255)
    return im, np.repeat(expected[..., None], 3, -1)


def _source(mode: str) -> tuple[Image.Image, np.ndarray]:
    """A ``mode`` image and the (H, W, 3) RGB shares in [0, 1] it stands for."""
    gray3 = np.repeat(GRAY[..., None], 3, -1)
    if mode == "I;16":
        return Image.fromarray(np.rint(GRAY * 65535).astype(np.uint16)), gray3
    if mode == "I;16B":
        data = np.rint(GRAY * 65535).astype(">u2").tobytes()
        return Image.frombytes("I;16B", (W, H), data), gray3
    if mode == "I":  # how Pillow holds many 16-bit files
        return Image.fromarray(np.rint(GRAY * 65535).astype(np.int32)), gray3
    if mode == "F":
        return Image.fromarray(GRAY.astype(np.float32)), gray3
    if mode == "LA":
        la = np.stack([GRAY, ALPHA], -1)
        return Image.fromarray(np.rint(la * 255).astype(np.uint8), "LA"), _over_white(gray3, ALPHA[..., None])
    if mode == "P+transparency":
        return _palette_with_transparency()
    rgb = Image.fromarray(np.rint(RGB * 255).astype(np.uint8))
    return rgb.convert(mode), RGB  # CMYK, YCbCr: a lossless round trip of RGB


MODES = ["I;16", "I;16B", "I", "F", "LA", "P+transparency", "CMYK", "YCbCr"]


def _check(out: np.ndarray, expected: np.ndarray, mode: str) -> None:
    got = out.astype(np.float64) / 255
    assert got.shape == expected.shape
    assert abs(got.mean() - expected.mean()) < 0.01, (mode, got.mean(), expected.mean())
    assert abs(got.std() - expected.std()) < 0.01, (mode, got.std(), expected.std())
    assert np.abs(got - expected).max() < 0.03, mode  # pixel by pixel, not only on average


@pytest.mark.parametrize("mode", MODES)
def test_reader_conversion_keeps_the_value_range(mode):
    im, expected = _source(mode)
    _check(to_rgb_array(im), expected, mode)


@pytest.mark.parametrize("mode", MODES)
def test_curation_normalize_keeps_the_value_range(mode):
    im, expected = _source(mode)
    out, data, ext, size = normalize_image(im, b"", "", NormalizeConfig())
    assert out.mode == "RGB" and size == (W, H)
    _check(np.asarray(out), expected, mode)
    _check(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), expected, mode)  # the stored bytes


def test_sixteen_bit_png_file_through_curation_is_not_white():
    """The reported case end to end: an ``I;16`` PNG decoded, validated and normalized."""
    buf = io.BytesIO()
    Image.fromarray(np.rint(GRAY * 65535).astype(np.uint16)).save(buf, format="PNG")
    im, reason, fmt = decode_validate(buf.getvalue(), ValidateConfig())
    assert reason is None and im.mode.startswith("I")
    out, _, _, _ = normalize_image(im, buf.getvalue(), fmt, NormalizeConfig())
    _check(np.asarray(out), np.repeat(GRAY[..., None], 3, -1), "I;16 png")
