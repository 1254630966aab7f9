"""The synth registry, per-sample seeding, verification and shard writing.

Every generator is one registry entry: a ``make`` function that draws an image and writes its
question and answer from data it chose, a ``check`` function (in ``checks.py``) that re-derives
the answer from the stored data without calling ``make``'s code, and an options dataclass.

Sample ``i`` of ``(kind, seed, split)`` draws only from its own RNG, seeded by the four values,
so ``regenerate(kind, seed, split, i)`` rebuilds that sample alone, byte for byte. Different
splits hash to different seed streams; ``check_disjoint`` proves two shard folders share no image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from data_tools.shards import ShardWriter, read_manifest

log = logging.getLogger(__name__)


class SynthError(ValueError):
    """Bad synth arguments (unknown kind, unknown option, ...); the message says what is valid."""


class CheckFailed(Exception):
    """A generated sample whose answer did not survive the independent re-check."""


@dataclass
class Draft:
    """One generated sample before encoding: what ``make`` returns and ``check`` inspects.

    ``aux`` holds data the check needs but that is not written (object masks, drawn text boxes).
    ``images``: a sample of several images (a document's pages), in order, written as
    ``{key}.0.png``, ``{key}.1.png``, ... with an ``images`` list in its json; ``image`` is the first.
    """

    image: Image.Image
    task: str
    messages: list[dict[str, str]]
    meta: dict[str, Any]
    points: list[dict[str, Any]] = field(default_factory=list)
    aux: dict[str, Any] = field(default_factory=dict)
    ext: str = "png"
    images: list[Image.Image] | None = None


@dataclass(frozen=True)
class Generator:
    name: str
    make: Callable[[np.random.Generator, Any], Draft]
    check: Callable[[Draft], None]  # raises CheckFailed("reason")
    options: type  # a dataclass of options with defaults
    summary: str


REGISTRY: dict[str, Generator] = {}


def register(name: str, options: type, check: Callable[[Draft], None], summary: str):
    """Decorator: register ``make`` under ``name`` (each kind defined once)."""

    def deco(make: Callable[[np.random.Generator, Any], Draft]):
        if name in REGISTRY:
            raise RuntimeError(f"synth generator {name!r} registered twice")
        REGISTRY[name] = Generator(name, make, check, options, summary)
        return make

    return deco


def get_generator(kind: str) -> Generator:
    if kind not in REGISTRY:
        valid = ", ".join(sorted(REGISTRY))
        raise SynthError(f"unknown synth kind {kind!r}; valid kinds: {valid}")
    return REGISTRY[kind]


def build_options(kind: str, options: dict[str, Any]) -> Any:
    """The kind's options dataclass filled from ``options``; unknown names list the valid ones."""
    gen = get_generator(kind)
    names = {f.name for f in dataclasses.fields(gen.options)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise SynthError(
            f"synth {kind}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}"
        )
    fields = {f.name: f for f in dataclasses.fields(gen.options)}
    values = dict(options)
    for name, value in options.items():
        f = fields[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if isinstance(default, list):
            if isinstance(value, str):
                values[name] = [value]  # `--opt question_types=count` means one item
            elif not isinstance(value, list | tuple):
                raise SynthError(f"synth {kind}: option {name} must be a list, got {value!r}")
            else:
                values[name] = list(value)
        elif isinstance(default, float) and not (
            isinstance(value, int | float) and not isinstance(value, bool)
        ):
            raise SynthError(f"synth {kind}: option {name} must be a number, got {value!r}")
        elif (
            isinstance(default, int)
            and not isinstance(default, bool)
            and (not isinstance(value, int) or isinstance(value, bool))
        ):
            raise SynthError(f"synth {kind}: option {name} must be an integer, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise SynthError(f"synth {kind}: option {name} must be a string, got {value!r}")
    opts = gen.options(**values)
    validate = getattr(opts, "validate", None)
    if validate is not None:
        validate()
    return opts


def sample_rng(kind: str, seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG of one sample: a SeedSequence over (kind, seed, split, index).

    Kind and split enter as CRC32 words, so the ``eval`` split draws from seed streams disjoint
    from ``train`` for the same seed; the index makes every sample independent of the others.
    """
    if seed < 0 or index < 0:
        raise SynthError(f"synth: seed and index must be >= 0 (got seed={seed}, index={index})")
    words = [zlib.crc32(kind.encode()), seed & 0xFFFFFFFF, seed >> 32, zlib.crc32(split.encode()), index]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def sample_id(kind: str, seed: int, split: str, index: int) -> str:
    return f"synth-{kind}-{split}-s{seed}-{index:07d}"


def encode_image(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, format="PNG", compress_level=3)
    elif ext == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=90, subsampling=0)
    else:
        raise SynthError(f"synth: image format {ext!r} not supported (png or jpg)")
    return buf.getvalue()


def _build(
    gen: Generator, opts: Any, seed: int, split: str, index: int
) -> tuple[bytes | list[bytes], dict, Draft]:
    """(image bytes, or a list for a several-image sample; json record; draft) of one sample."""
    rng = sample_rng(gen.name, seed, split, index)
    draft = gen.make(rng, opts)
    imgs = [im.convert("RGB") for im in (draft.images or [draft.image])]
    datas = [encode_image(img, draft.ext) for img in imgs]
    sid = sample_id(gen.name, seed, split, index)
    entries = [
        {
            "width": img.width,
            "height": img.height,
            "sha256": hashlib.sha256(data).hexdigest(),
            "phash": str(imagehash.phash(img)),
        }
        for img, data in zip(imgs, datas)
    ]
    record = {
        "id": sid,
        "source": f"synth/{gen.name}",
        **({"image": entries[0]} if len(entries) == 1 else {"images": entries}),
        "task": draft.task,
        "messages": draft.messages,
        "points": draft.points,
        "meta": {"kind": gen.name, "seed": seed, "split": split, "index": index, **draft.meta},
    }
    return (datas[0] if len(datas) == 1 else datas), record, draft


def regenerate(
    kind: str, seed: int, split: str, index: int, **options: Any
) -> tuple[bytes | list[bytes], dict]:
    """Rebuild sample ``index`` of ``(kind, seed, split)`` by itself: (image bytes, json record);
    the bytes are a list, in page order, for a several-image sample.

    Pass the same ``options`` as the original run (the manifest records them). Raises
    ``CheckFailed`` if this index is one the generator dropped.
    """
    gen = get_generator(kind)
    opts = build_options(kind, options)
    data, record, draft = _build(gen, opts, seed, split, index)
    gen.check(draft)
    return data, record


def generate(
    kind: str,
    n: int,
    seed: int,
    out: str | Path,
    split: str = "train",
    shard_size: int = 500,
    **options: Any,
) -> dict:
    """Write ``n`` verified samples of ``kind`` as shards under ``out``; returns the manifest.

    Indices run 0, 1, 2, ...; a sample that fails its check is dropped and counted (by reason)
    and the next index is tried, so the manifest's ``indices_dropped`` lists the gaps. Gives up
    with an error if more than half of the first 50+ attempts fail (a generator bug, not bad luck).
    """
    gen = get_generator(kind)
    opts = build_options(kind, options)
    if n < 0:
        raise SynthError(f"synth {kind}: n must be >= 0, got {n}")
    if shard_size < 1:
        raise SynthError(f"synth {kind}: shard_size must be >= 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise SynthError(
            f"synth {kind}: split {split!r} may hold only letters, digits and '_' (it names the sample keys)"
        )
    out = Path(out)
    dropped: Counter[str] = Counter()
    dropped_indices: list[int] = []
    tasks: Counter[str] = Counter()
    index = 0
    writer = ShardWriter(out, prefix=f"synth-{kind}-{split}", max_count=shard_size)
    try:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"synth {kind}", unit="img", disable=n < 200, leave=False)
        written = 0
        while written < n:
            data, record, draft = _build(gen, opts, seed, split, index)
            try:
                gen.check(draft)
            except CheckFailed as e:
                reason = str(e).split(":")[0]
                dropped[reason] += 1
                dropped_indices.append(index)
                log.debug("synth %s: dropped %s: %s", kind, record["id"], e)
                if index >= 50 and len(dropped_indices) > index // 2:
                    raise RuntimeError(
                        f"synth {kind}: {len(dropped_indices)} of {index + 1} samples failed their check "
                        f"({dict(dropped)}); the generator is broken for options {dataclasses.asdict(opts)}"
                    ) from e
            else:
                exts = draft.ext if isinstance(data, bytes) else [draft.ext] * len(data)
                writer.write(record["id"], data, exts, record)
                tasks[record["task"]] += 1
                written += 1
                bar.update(1)
            index += 1
        bar.close()
    except BaseException as e:  # leave no half-written shard behind
        writer.__exit__(type(e), e, e.__traceback__)
        raise
    return writer.close(
        extra={
            "synth": {
                "kind": kind,
                "seed": seed,
                "split": split,
                "options": dataclasses.asdict(opts),
                "attempted": index,
                "dropped": sum(dropped.values()),
                "dropped_by_reason": dict(sorted(dropped.items())),
                "indices_dropped": dropped_indices,
                "tasks": dict(sorted(tasks.items())),
            }
        }
    )


def shard_image_hashes(shard_dir: str | Path) -> dict[str, str]:
    """sha256 of every image in a shard folder's tars (hashed from the bytes) -> sample key."""
    hashes: dict[str, str] = {}
    manifest = read_manifest(shard_dir)
    for shard in manifest["shards"]:
        with tarfile.open(Path(shard_dir) / shard["name"]) as tar:
            for member in tar:
                stem, _, ext = member.name.rpartition(".")  # a page keeps its number: key.2
                if ext in ("png", "jpg", "jpeg", "webp"):
                    f = tar.extractfile(member)
                    assert f is not None
                    hashes[hashlib.sha256(f.read()).hexdigest()] = stem
    return hashes


def check_disjoint(train_dir: str | Path, eval_dir: str | Path) -> dict:
    """Prove two shard folders share no image (by sha256 of the image bytes).

    Returns ``{"train": n, "eval": m, "shared": [...]}``; raises ``SynthError`` naming the
    first shared samples when any image appears in both.
    """
    a, b = shard_image_hashes(train_dir), shard_image_hashes(eval_dir)
    shared = sorted(set(a) & set(b))
    if shared:
        pairs = ", ".join(f"{a[h]} == {b[h]}" for h in shared[:5])
        raise SynthError(
            f"{len(shared)} image(s) appear in both {train_dir} and {eval_dir}: {pairs}; "
            "held-out data must come from a different split or seed"
        )
    return {"train": len(a), "eval": len(b), "shared": []}
