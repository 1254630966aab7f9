"""Curation config: nested dataclasses loaded with the same strict machinery as run configs.

A YAML file under ``configs/curate/`` fills :class:`CurateConfig`; dotted overrides
(``dedup.max_distance=6``) work as for training. Unknown keys fail with the list of valid keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mmsmall.config import ConfigError, apply_override, from_dict
from mmsmall.resources import find_config

INPUT_KINDS = ("folder", "jsonl", "csv", "parquet", "hf", "webdataset", "points", "pixmo")
COORD_SPACES = ("normalized", "pixels", "percent")


@dataclass
class InputConfig:
    kind: str = "folder"  # one of INPUT_KINDS
    path: str = ""  # folder, file, or shard folder / .tar file
    name: str = ""  # source name written into each sample ("" = the path's stem)
    captions: str | None = None  # folder kind: a .jsonl or .csv with one row per image
    image_root: str | None = None  # where relative image paths of rows live (default: beside the file)
    image_field: str = "image"  # row field / parquet column with the image (bytes, path or {bytes,path})
    images_field: str = "images"  # row field / column with a list of images (pages), each as image_field
    id_field: str = "id"  # row field with a sample id ("" or missing = row number)
    text_field: str = "caption"  # caption field (caption task)
    question_field: str = "question"  # vqa rows: question and answer fields
    answer_field: str = "answer"
    task: str = ""  # task written into the samples ("" = caption, vqa or pointing as found)
    coords: str = "normalized"  # points kind: normalized [0,1] | pixels | percent (0-100)
    split: str = "train"  # hf kind: split to read from a DatasetDict
    config: str = ""  # hf kind: dataset config name (e.g. DocVQA / InfographicVQA)
    streaming: bool = False  # hf kind: stream the data (one unit per data file) instead of materializing
    layout: str = ""  # pixmo kind: points | count | cap | ama | docs | clocks (data_tools/pixmo.py)
    downloads: str = ""  # pixmo kind: the download stage's folder holding the rows' image_url images
    hold_out: str = ""  # pixmo kind: an eval set (allenai/pixmo-points-eval or a copy) whose images stay out


@dataclass
class ValidateConfig:
    min_side: int = 32  # drop images whose shorter side is below this (pixels)
    max_aspect: float = 4.0  # drop images with long/short side ratio above this
    max_pixels: int = 89_478_485  # decompression-bomb cap, checked from the header before decoding
    max_bytes: int = 64 * 1024 * 1024  # files larger than this are dropped unread
    allow_animated: bool = False


@dataclass
class NormalizeConfig:
    max_side: int = 0  # 0 = keep size; else downscale so the longer side is at most this
    format: str = "keep"  # keep | jpg | png: re-encode format (keep = JPEG stays JPEG, others PNG)
    jpeg_quality: int = 92


@dataclass
class DedupConfig:
    exact: bool = True  # sha256 of the normalized image bytes
    near: bool = True  # 64-bit perceptual hash within max_distance bits
    max_distance: int = 6  # bits; re-encodes and resizes drift 0-4, 3% crops up to ~8
    bands: int = 0  # multi-index bands (0 = max_distance + 2)


@dataclass
class TextConfig:
    enabled: bool = True
    min_chars: int = 1
    max_chars: int = 2000
    min_words: int = 1
    max_words: int = 400
    max_repeat_ratio: float = 0.5  # drop if the most common word 3-gram covers more than this share
    boilerplate: list[str] = field(
        default_factory=lambda: [
            "click here",
            "lorem ipsum",
            "all rights reserved",
            "image not found",
            "stock photo",
            "placeholder",
            "subscribe",
        ]
    )
    languages: list[str] = field(default_factory=list)  # keep only these ISO codes; needs `langid`


@dataclass
class ClipConfig:
    enabled: bool = False
    model: str = "ViT-B-32"  # open_clip model name (or the name given to `custom`)
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint path; None = random init
    custom: dict | None = None  # open_clip model config registered under `model`
    threshold: float | None = None  # absolute cosine-similarity cut
    quantile: float | None = None  # or drop the lowest share, e.g. 0.1 (computed globally)
    batch_size: int = 64
    device: str = "cpu"
    threads: int = 0  # CPU torch threads per scoring process (0 = default); workers x threads <= cores
    bf16: bool = True  # on CUDA, run the towers under bf16 autocast (scores are still compared in fp32)


# decontamination benchmark layouts: eval's (read by eval's loaders), any parquet, our shards
BENCHMARK_FORMATS = (
    "auto",
    "webdataset",
    "parquet",
    "chartqa",
    "docvqa",
    "infovqa",
    "textvqa",
    "ai2d",
    "ocrbench",
    "multidocvqa",
    "muirbench",
)


@dataclass
class BenchmarkConfig:
    path: str = ""  # any layout `mmsmall eval --data` accepts: a folder or file (see data_tools/decontam.py)
    format: str = "auto"  # one of BENCHMARK_FORMATS
    name: str = ""


@dataclass
class DecontamConfig:
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    images: bool = True  # pHash match of images
    image_max_distance: int = 4  # pHash bits
    text: bool = True  # n-gram overlap of questions (off for templated synthetic questions)
    ngram: int = 8  # question word n-grams; questions shorter than this match whole


@dataclass
class ReportConfig:
    enabled: bool = True
    grid_size: int = 12  # samples per grid
    borderline: float = 0.02  # CLIP score distance from the threshold counted as borderline


@dataclass
class CurateConfig:
    name: str = "curated"
    inputs: list[InputConfig] = field(default_factory=list)
    out_dir: str = "curated"  # shards, manifest.json, report/
    work_dir: str = ""  # per-unit stage files and done-markers ("" = {out_dir}/_work)
    keep_work: bool = (
        True  # keep stage files after success (fast reruns with new thresholds); false frees the disk
    )
    prefix: str = "data"
    shard_size: int = 1000
    unit_size: int = 500  # input samples per work unit (webdataset: one tar per unit)
    seed: int = 0
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    text: TextConfig = field(default_factory=TextConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def validate_curate(cfg: CurateConfig) -> None:
    """Cross-field checks with messages that say what to change."""
    if not cfg.inputs:
        raise ConfigError("inputs: empty; list at least one input, e.g. {kind: folder, path: images/}")
    for i, inp in enumerate(cfg.inputs):
        if inp.kind not in INPUT_KINDS:
            raise ConfigError(f"inputs[{i}].kind: {inp.kind!r}; valid: {', '.join(INPUT_KINDS)}")
        if not inp.path:
            raise ConfigError(f"inputs[{i}].path: empty; give the folder or file to read")
        if inp.coords not in COORD_SPACES:
            raise ConfigError(f"inputs[{i}].coords: {inp.coords!r}; valid: {', '.join(COORD_SPACES)}")
        dl = Path(inp.downloads) if inp.downloads else None
        if dl is not None and (dl / "shards").is_dir() and not (dl / "fetch_log.jsonl").exists():
            raise ConfigError(
                f"inputs[{i}].downloads: {dl} holds webdataset shards (mmsmall download's default output); "
                "the pixmo input reads the loose-file layout: fetch again with `mmsmall download ROWS --out "
                f"{dl} --url-field image_url --sha256-field image_sha256 --output files`"
            )
    if cfg.normalize.format not in ("keep", "jpg", "png"):
        raise ConfigError(f"normalize.format: {cfg.normalize.format!r}; valid: jpg, keep, png")
    if not 0 <= cfg.dedup.max_distance < 32:
        raise ConfigError(f"dedup.max_distance: {cfg.dedup.max_distance}; use 0..31 bits")
    if cfg.clip.threshold is not None and cfg.clip.quantile is not None:
        raise ConfigError("clip: give threshold or quantile, not both")
    if cfg.clip.quantile is not None and not 0.0 <= cfg.clip.quantile < 1.0:
        raise ConfigError(f"clip.quantile: {cfg.clip.quantile}; expected a share in [0, 1)")
    for i, b in enumerate(cfg.decontam.benchmarks):
        if b.format not in BENCHMARK_FORMATS:
            raise ConfigError(
                f"decontam.benchmarks[{i}].format: {b.format!r}; valid: {', '.join(BENCHMARK_FORMATS)}"
            )
    if cfg.shard_size < 1 or cfg.unit_size < 1:
        raise ConfigError("shard_size and unit_size must be at least 1")


def load_curate_config(
    config: str | Path | dict | CurateConfig, overrides: list[str] | tuple[str, ...] = ()
) -> CurateConfig:
    """A :class:`CurateConfig` from a YAML path, a dict, or a config object, plus dotted overrides.

    Relative paths inside a YAML file stay relative to the current directory (as users type them).
    """
    import yaml

    if isinstance(config, CurateConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = from_dict(CurateConfig, config)
    else:
        path = find_config(config)  # a shipped config (configs/curate/...) from any directory too
        if not path.exists():
            raise ConfigError(f"curate config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        try:
            cfg = from_dict(CurateConfig, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for ov in overrides:
        apply_override(cfg, ov)
    validate_curate(cfg)
    return cfg
