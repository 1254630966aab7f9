"""Molmo multi-crop tiling: one image -> a low-resolution view plus overlapping high-res crops.

The output matches transformers' ``Molmo2ImageProcessor`` for the same settings (pixel values
within float rounding, identical pooling indices and grids), so a checkpoint exported in the
stock Molmo2 format sees the same inputs in stock transformers:

1. choose a tiling ``(th, tw)`` with ``th * tw <= max_crops`` whose windows best fit the image,
2. resize the whole image (bilinear, no antialias, rounded to bytes) to the canvas
   ``th * window + margins`` and, separately, to one ``crop_size`` square (the low-res view),
3. cut the canvas into ``th x tw`` crops of ``crop_size`` that overlap by the margins,
4. list, for every pooled output token, the ``pool_h * pool_w`` patch indices it pools
   (``-1`` where a pooling window hangs over the edge), the overlapping margins dropped.

Unlike the stock processor this works on one image with one float conversion shared by both
resizes and writes the patches straight into the output tensor (no intermediate crop copies).

Image hygiene lives here too: :func:`load_image` refuses oversized files before decoding and
names the file on any decode error; :func:`to_rgb_array` applies the EXIF orientation and
composites transparency on white (what transformers does).
"""

from __future__ import annotations

import io
import os
import warnings
from functools import lru_cache
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import to_rgb_image

_RESCALE = 1 / 255  # the stock processor's rescale_factor; mean/std are scaled by its inverse


class ImageLoadError(ValueError):
    """An image file could not be read; the message names the file and what to do."""


# ----------------------------------------------------------------------------- loading


def load_image(source: str | os.PathLike | bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """Open and fully decode an image as RGB (EXIF orientation applied, alpha on white).

    ``source`` is a path, the encoded bytes, or a binary file object; ``name`` is used in error
    messages (defaults to the path). Raises :class:`ImageLoadError` for unreadable, truncated or
    oversized files; the size check reads only the header, so a decompression bomb is never
    decoded. The limit is Pillow's ``Image.MAX_IMAGE_PIXELS`` (None disables it).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp: str | os.PathLike | BinaryIO = io.BytesIO(source)
        label = name or "<image bytes>"
    else:
        fp = source
        label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source))
    try:
        with warnings.catch_warnings():  # our own, stricter limit is enforced below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{label}: refused, {e}. Downscale the image first.") from None
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{label}: not a readable image ({e}); remove or re-export the file") from None
    limit = Image.MAX_IMAGE_PIXELS
    width, height = im.size
    if limit is not None and width * height > limit:
        im.close()
        raise ImageLoadError(
            f"{label}: {width}x{height} = {width * height} pixels is above the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS); refused without decoding. Downscale the image, or raise "
            "the limit if you trust the file."
        )
    if width == 0 or height == 0:
        raise ImageLoadError(f"{label}: the image is empty ({width}x{height})")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(
            f"{label}: could not decode ({e}); the file is truncated or corrupt. Remove or re-export it."
        ) from None
    return to_rgb_image(im)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 array: EXIF orientation applied, any alpha composited on white.

    16- and 32-bit integer and float grayscale are scaled into 0-255 with their value range kept
    (:func:`high_depth_to_l`); palette, CMYK, YCbCr and other 8-bit modes go through Pillow's
    ``convert("RGB")``; images with an alpha band or palette transparency are composited on white
    first, as transformers' ``convert_to_rgb`` does. Arrays must already be ``(H, W, 3)`` uint8 RGB.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB array, got {image.dtype} {tuple(image.shape)}; "
                "pass a PIL image for other formats"
            )
        return np.ascontiguousarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")
    return np.asarray(to_rgb_image(image))


# ----------------------------------------------------------------------------- geometry


@lru_cache(maxsize=64)
def _tilings(max_crops: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """All (th, tw) with th * tw <= max_crops, ordered by crop count, then by th."""
    tilings = sorted(
        ((h, w) for h in range(1, max_crops + 1) for w in range(1, max_crops + 1) if h * w <= max_crops),
        key=lambda t: (t[0] * t[1], t[0]),
    )
    return np.asarray(tilings, dtype=np.int64), tilings


def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[int, int]:
    """The tiling whose windows cover ``(height, width)`` with the least upscaling, else the
    least downscaling; computed in float32 like Molmo2 so that ties break the same way."""
    arr, tilings = _tilings(max_crops)
    cand = (arr * window).astype(np.float32)  # (K, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = (cand / np.asarray([height, width], dtype=np.float32)).min(axis=1)  # (K,)
    if np.all(scales < 1):
        return tilings[int(np.argmax(scales))]
    scales = np.where(scales < 1.0, np.float32(10e9), scales)
    return tilings[int(np.argmin(scales))]


def _check(crop_size: int, patch_size: int, max_crops: int, margins: tuple[int, int], pool: tuple[int, int]):
    if crop_size % patch_size:
        raise ValueError(f"crop_size={crop_size} must be a multiple of patch_size={patch_size}")
    if max_crops < 1:
        raise ValueError(f"max_crops={max_crops} must be at least 1")
    if min(margins) < 0 or sum(margins) >= crop_size // patch_size:
        raise ValueError(
            f"overlap_margins={list(margins)} must be >= 0 and leave a window inside a crop of "
            f"{crop_size // patch_size} patches"
        )
    if min(pool) < 1:
        raise ValueError(f"pooling_size={list(pool)} must be positive")


def crop_geometry(
    height: int,
    width: int,
    *,
    crop_size: int,
    patch_size: int,
    max_crops: int,
    overlap_margins: tuple[int, int],
) -> tuple[int, int, int, int]:
    """``(th, tw, canvas_h, canvas_w)`` for an image of ``height x width`` pixels."""
    crop_patches = crop_size // patch_size
    margin = sum(overlap_margins) * patch_size
    window = (crop_patches - sum(overlap_margins)) * patch_size
    th, tw = select_tiling(height - margin, width - margin, window, max_crops)
    return th, tw, th * window + margin, tw * window + margin


def image_grid(
    height: int,
    width: int,
    *,
    crop_size: int = 378,
    patch_size: int = 14,
    max_crops: int = 8,
    overlap_margins: tuple[int, int] | list[int] = (4, 4),
    pooling_size: tuple[int, int] | list[int] = (2, 2),
) -> tuple[list[int], int]:
    """``([low_h, low_w, high_h, high_w], n_crops)`` without touching pixels (token counting)."""
    margins, pool = tuple(overlap_margins), tuple(pooling_size)
    _check(crop_size, patch_size, max_crops, margins, pool)
    th, tw, ch, cw = crop_geometry(
        height,
        width,
        crop_size=crop_size,
        patch_size=patch_size,
        max_crops=max_crops,
        overlap_margins=margins,
    )
    cp = crop_size // patch_size
    grid = [
        -(-cp // pool[0]),
        -(-cp // pool[1]),
        -(-(ch // patch_size) // pool[0]),
        -(-(cw // patch_size) // pool[1]),
    ]
    return grid, th * tw + 1


def _pool_windows(index_grid: np.ndarray, pool_h: int, pool_w: int) -> np.ndarray:
    """(R, C) patch indices -> (ceil(R/ph) * ceil(C/pw), ph * pw) windows, centred -1 padding."""
    rows, cols = index_grid.shape
    pad_h, pad_w = -rows % pool_h, -cols % pool_w
    padded = np.pad(
        index_grid, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)), constant_values=-1
    )
    nr, nc = padded.shape[0] // pool_h, padded.shape[1] // pool_w
    return padded.reshape(nr, pool_h, nc, pool_w).transpose(0, 2, 1, 3).reshape(nr * nc, pool_h * pool_w)


@lru_cache(maxsize=256)
def _pooling(
    th: int, tw: int, crop_patches: int, margins: tuple[int, int], pool: tuple[int, int]
) -> np.ndarray:
    """Pooling indices (n_tokens, ph * pw), low-res view first; read-only, cached per layout."""
    lm, rm = margins
    grid = np.arange(th * tw * crop_patches**2, dtype=np.int64).reshape(th, tw, crop_patches, crop_patches)
    # Patches in the overlap margins of interior crop edges are seen by a neighbour: drop them.
    keep = np.ones((th, tw, crop_patches, crop_patches), dtype=bool)
    if lm:
        keep[1:, :, :lm, :] = False
        keep[:, 1:, :, :lm] = False
    if rm:
        keep[:-1, :, crop_patches - rm :, :] = False
        keep[:, :-1, :, crop_patches - rm :] = False
    order = (0, 2, 1, 3)  # (th, row, tw, col): canvas raster order
    kept = grid.transpose(order)[keep.transpose(order)]
    n_rows = th * (crop_patches - lm - rm) + lm + rm
    high = _pool_windows(kept.reshape(n_rows, -1), *pool)
    high = np.where(high >= 0, high + crop_patches**2, -1)  # the low-res view comes first
    low = _pool_windows(np.arange(crop_patches**2, dtype=np.int64).reshape(crop_patches, crop_patches), *pool)
    out = np.concatenate([low, high])
    out.setflags(write=False)
    return out


# ----------------------------------------------------------------------------- pixels


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a (possibly read-only, e.g. PIL-backed) array; it is only ever read."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def _resize_rounded(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, H, W) float32 of byte values -> (1, 3, h, w) bilinear, no antialias, rounded to bytes."""
    out = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=False)
    if not out.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out.round_().clamp_(0, 255)


def _mean_std(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """The (3,) float32 mean and std on the byte scale (the stock processor's values over its
    rescale factor), as every normalization here uses them."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean={list(mean)} and std={list(std)} need 3 values each, std > 0")
    scale = 1.0 / _RESCALE
    return torch.tensor(mean, dtype=torch.float32) * scale, torch.tensor(std, dtype=torch.float32) * scale


def _normalize(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(1, 3, h, w) channels-last byte values -> (h, w, 3) ``(x - mean) / std``, in place.

    Mean and std are tiled along whole rows, so the broadcast runs over a long contiguous inner
    dimension (a (3,) broadcast over channels-last memory is ~10x slower); same arithmetic.
    """
    hwc = image[0].permute(1, 2, 0)  # (h, w, 3), contiguous
    h, w, _ = hwc.shape
    rows = hwc.view(h, w * 3)
    rows.sub_(mean.repeat(w)).div_(std.repeat(w))
    return hwc


def normalize_pixels(
    pixels: torch.Tensor,
    mean: tuple[float, ...] | list[float],
    std: tuple[float, ...] | list[float],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 crops ``(N, P, 3*patch^2)`` (``preprocess_image(..., normalize=False)``) -> float32
    ``(x - mean) / std``, bit for bit what ``preprocess_image`` returns with ``normalize=True``:
    the same float32 subtraction and division of the same values, only done after the crops are
    cut instead of before (each is elementwise, so the order of cutting does not matter).

    One pass per crop: the byte -> float copy, the subtraction and the division of a crop
    (~1.3 MB at 336 px) run while it is in cache. ``out`` (float32, same shape) is written if given.
    """
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[2] % 3:
        raise ValueError(f"expected uint8 crops (N, P, 3*patch^2), got {pixels.dtype} {tuple(pixels.shape)}")
    mean_t, std_t = _mean_std(mean, std)
    per_patch = pixels.shape[2] // 3  # each patch is flattened (py, px, channel): channel innermost
    mean_row, std_row = mean_t.repeat(per_patch), std_t.repeat(per_patch)  # (C,)
    if out is None:
        out = torch.empty(pixels.shape, dtype=torch.float32)
    for src, dst in zip(pixels, out):  # (P, C) each
        dst.copy_(src)
        dst.sub_(mean_row).div_(std_row)
    return out


def preprocess_image(
    image: Image.Image | np.ndarray,
    *,
    crop_size: int = 378,
    patch_size: int = 14,
    max_crops: int = 8,
    overlap_margins: tuple[int, int] | list[int] = (4, 4),
    pooling_size: tuple[int, int] | list[int] = (2, 2),
    mean: tuple[float, ...] | list[float] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] | list[float] = (0.5, 0.5, 0.5),
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """Tile one image the way ``Molmo2ImageProcessor`` does.

    Returns ``pixel_values (1 + th*tw, (crop/patch)^2, 3*patch*patch)`` float32 (low-res view
    first; each patch flattened as ``(py, px, channel)``), ``image_token_pooling (n_tokens,
    pool_h*pool_w)`` int64 with ``-1`` padding, ``image_grids (1, 4)`` int64 =
    ``[low_h, low_w, high_h, high_w]`` in pooled tokens, and ``image_num_crops (1,)`` int64.
    Any image size works: tiny images are upscaled onto the canvas, extreme aspect ratios get
    a distorted canvas, exactly as in Molmo2.

    ``normalize=False`` returns ``pixel_values`` as uint8: the resized pixels before
    ``(x - mean) / std`` (they are rounded to bytes first, as in Molmo2), 4x smaller to move
    between processes; :func:`normalize_pixels` turns them into exactly the float32 values.
    """
    margins, pool = tuple(int(m) for m in overlap_margins), tuple(int(p) for p in pooling_size)
    _check(crop_size, patch_size, max_crops, margins, pool)
    mean_t, std_t = _mean_std(mean, std)
    arr = to_rgb_array(image)  # (H, W, 3) uint8
    height, width = arr.shape[:2]
    th, tw, canvas_h, canvas_w = crop_geometry(
        height,
        width,
        crop_size=crop_size,
        patch_size=patch_size,
        max_crops=max_crops,
        overlap_margins=margins,
    )
    cp, P = crop_size // patch_size, patch_size
    window = (cp - sum(margins)) * P

    # One float copy feeds both resizes. It stays channels-last (N, C, H, W view of HWC memory):
    # PyTorch's channels-last bilinear kernel gives bit-identical results to the channels-first one
    # the stock processor uses (the tests check it) and is many times faster on large images.
    src = _as_tensor(arr).to(torch.float32).unsqueeze(0).permute(0, 3, 1, 2)  # (1, 3, H, W), HWC memory

    def finish(resized: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w) channels-last rounded values -> (h, w, 3): normalized in place, or bytes."""
        if normalize:
            return _normalize(resized, mean_t, std_t)
        return resized[0].permute(1, 2, 0).to(torch.uint8)  # exact: whole numbers in 0..255

    low = finish(_resize_rounded(src, (crop_size, crop_size)))  # (S, S, 3)
    if (canvas_h, canvas_w) == (crop_size, crop_size):  # one crop: the same resize as the low-res view
        canvas = low
    else:
        canvas = finish(_resize_rounded(src, (canvas_h, canvas_w)))  # (Hc, Wc, 3)
    del src

    n_crops = 1 + th * tw
    dtype = torch.float32 if normalize else torch.uint8
    pixel_values = torch.empty((n_crops, cp * cp, P * P * 3), dtype=dtype)
    # low-res view: (cp, P, cp, P, 3) -> (cp, cp, P, P, 3)
    pixel_values[0].view(cp, cp, P, P, 3).copy_(low.reshape(cp, P, cp, P, 3).transpose(1, 2))
    # crops: one strided view of the canvas, (th, tw, cp, cp, P, P, 3), copied once into place
    s_h, s_w, s_c = canvas.stride()
    crops = canvas.as_strided(
        (th, tw, cp, cp, P, P, 3),
        (window * s_h, window * s_w, P * s_h, P * s_w, s_h, s_w, s_c),
    )
    pixel_values[1:].view(th, tw, cp, cp, P, P, 3).copy_(crops)

    pooling = torch.from_numpy(_pooling(th, tw, cp, margins, pool).copy())
    n_rows = -(-(canvas_h // P) // pool[0])
    n_cols = -(-(canvas_w // P) // pool[1])
    grids = torch.tensor([[-(-cp // pool[0]), -(-cp // pool[1]), n_rows, n_cols]], dtype=torch.int64)
    return {
        "pixel_values": pixel_values,
        "image_token_pooling": pooling,
        "image_grids": grids,
        "image_num_crops": torch.tensor([n_crops], dtype=torch.int64),
    }
