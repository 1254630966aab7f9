"""crops.preprocess_image equals transformers' Molmo2ImageProcessor; image loading hygiene."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

from mmsmall.config import ImageConfig
from mmsmall.export.molmo2 import molmo2_image_processor
from mmsmall.processing.crops import (
    ImageLoadError,
    image_grid,
    load_image,
    normalize_pixels,
    preprocess_image,
    to_rgb_array,
)

SETTINGS = {
    "default": dict(crop_size=378, patch_size=14, max_crops=8, overlap_margins=(4, 4), pooling_size=(2, 2)),
    "tiny": dict(crop_size=112, patch_size=14, max_crops=4, overlap_margins=(1, 1), pooling_size=(2, 2)),
}


@pytest.fixture(scope="module")
def stock():
    return {
        name: molmo2_image_processor(ImageConfig(**s), max_crops=s["max_crops"])
        for name, s in SETTINGS.items()
    }


def _rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth gradient + noise: exercises interpolation rounding, not just noise
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _exif_rotated() -> tuple[Image.Image, Image.Image]:
    """A JPEG tagged with orientation 6 (rotate 90 CW), opened as stored, and its upright version."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    _rgb(40, 64, seed=3).save(buf, format="JPEG", exif=exif, quality=95)
    stored = Image.open(io.BytesIO(buf.getvalue()))
    return stored, ImageOps.exif_transpose(stored)


def _cases() -> dict[str, tuple[Image.Image, Image.Image]]:
    """name -> (what we are given, what the stock processor is given)."""
    rng = np.random.default_rng(1)
    rgba = np.concatenate([np.asarray(_rgb(33, 47)), rng.integers(0, 256, (33, 47, 1), dtype=np.uint8)], -1)
    palette = _rgb(50, 30).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    cases = {
        "tiny_5x7": _rgb(5, 7),
        "one_pixel": _rgb(1, 1),
        "huge_2000x3000": _rgb(2000, 3000),
        "wide_20x1500": _rgb(20, 1500),
        "tall_1500x20": _rgb(1500, 20),
        "photo_480x640": _rgb(480, 640),
        "odd_113x97": _rgb(113, 97),
        "gray": _rgb(70, 90).convert("L"),
        "gray_alpha": _rgb(70, 90).convert("LA"),
        "rgba": Image.fromarray(rgba, "RGBA"),
        "palette": palette,
        "palette_transparency": palette_t,
    }
    out = {name: (im, im) for name, im in cases.items()}
    out["exif_rotated"] = _exif_rotated()
    return out


CASES = _cases()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("case", list(CASES))
def test_equals_stock_molmo2(stock, setting, case):
    ours_in, stock_in = CASES[case]
    ours = preprocess_image(ours_in, **SETTINGS[setting])
    ref = stock[setting](stock_in, return_tensors="pt")
    assert ours["pixel_values"].dtype == torch.float32
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-5
    assert ours["image_token_pooling"].dtype == torch.int64
    assert torch.equal(ours["image_token_pooling"], ref["image_token_pooling"].long())
    assert torch.equal(ours["image_grids"], ref["image_grids"].long())
    assert torch.equal(ours["image_num_crops"], ref["image_num_crops"].long())
    grid, n_crops = image_grid(*to_rgb_array(ours_in).shape[:2], **SETTINGS[setting])
    assert grid == ours["image_grids"][0].tolist() and n_crops == ours["pixel_values"].shape[0]


@pytest.mark.parametrize("seed", range(6))
def test_equals_stock_random_sizes(stock, seed):
    rng = np.random.default_rng(100 + seed)
    h, w = (int(v) for v in rng.integers(1, 900, 2))
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for setting, ip in stock.items():
        ours = preprocess_image(im, **SETTINGS[setting])
        ref = ip(im, return_tensors="pt")
        assert ours["pixel_values"].shape == ref["pixel_values"].shape, (h, w, setting)
        assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-5, (h, w, setting)
        assert torch.equal(ours["image_token_pooling"], ref["image_token_pooling"].long()), (h, w, setting)


def test_exif_orientation_applied():
    stored, upright = _exif_rotated()
    assert stored.size == (64, 40) and upright.size == (40, 64)
    assert to_rgb_array(stored).shape == (64, 40, 3)


def test_alpha_composited_on_white():
    im = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    assert (to_rgb_array(im) == 255).all()


def test_bad_settings_and_empty_image_raise():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        preprocess_image(_rgb(10, 10), crop_size=100, patch_size=14)
    with pytest.raises(ValueError, match="overlap_margins"):
        preprocess_image(_rgb(10, 10), crop_size=112, patch_size=14, overlap_margins=(4, 4))
    with pytest.raises(ValueError, match="empty"):
        preprocess_image(Image.new("RGB", (0, 5)))


def test_load_image_ok(tmp_path):
    path = tmp_path / "ok.png"
    _rgb(20, 30).convert("LA").save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (30, 20)


def test_load_image_truncated_names_file(tmp_path):
    buf = io.BytesIO()
    _rgb(200, 200).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(path)


def test_load_image_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.png.*not a readable image"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_load_image_refuses_oversized_without_decoding(tmp_path, monkeypatch):
    buf = io.BytesIO()
    _rgb(100, 100).save(buf, format="PNG")
    header_only = buf.getvalue()[:100]  # dims are in the header; the pixel data is gone
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageLoadError, match="bomb.png.*above the limit"):
        load_image(header_only, name="bomb.png")
    # far above the limit Pillow itself refuses in open(); still our error, naming the file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="bomb.png"):
        load_image(header_only, name="bomb.png")


def test_equals_stock_with_per_channel_mean_std():
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # CLIP
    ip = Molmo2ImageProcessor(image_mean=mean, image_std=std)
    im = _rgb(300, 500, seed=5)
    ours = preprocess_image(im, mean=mean, std=std)
    ref = ip(im, return_tensors="pt")
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("case", ["one_pixel", "wide_20x1500", "photo_480x640", "odd_113x97", "rgba"])
def test_byte_crops_normalize_to_the_same_bits(stock, setting, case):
    """The data workers ship uint8 crops and the trainer normalizes them (normalize_pixels): the
    float32 values are bit for bit those of the default path. Molmo2 rounds the resized pixels to
    bytes before rescale-and-normalize too (transformers models/molmo2/image_processing_molmo2.py,
    ``resized.round().clamp(0, 255).to(image.dtype)``), so the bytes lose nothing."""
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # CLIP
    im = CASES[case][0]
    floats = preprocess_image(im, mean=mean, std=std, **SETTINGS[setting])
    raw = preprocess_image(im, mean=mean, std=std, normalize=False, **SETTINGS[setting])
    assert raw["pixel_values"].dtype == torch.uint8
    assert raw["pixel_values"].shape == floats["pixel_values"].shape
    for k in ("image_token_pooling", "image_grids", "image_num_crops"):
        assert torch.equal(raw[k], floats[k])
    got = normalize_pixels(raw["pixel_values"], mean, std)
    assert torch.equal(got.view(torch.int32), floats["pixel_values"].view(torch.int32))  # same bits
    out = torch.full_like(got, float("nan"))
    assert normalize_pixels(raw["pixel_values"], mean, std, out=out) is out and torch.equal(out, got)
    with pytest.raises(ValueError, match="expected uint8 crops"):
        normalize_pixels(floats["pixel_values"], mean, std)
