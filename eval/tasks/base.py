"""What a benchmark is, and the one registry of them.

A ``Task`` knows where its data lives (a loader that turns a local path or hub id into
``Record``s), how to ask (its pinned prompt), how many tokens to allow, and how to score one raw
response. Each benchmark file under ``eval/tasks/`` builds one ``Task`` and calls ``register``
once at import.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmsmall.processing.images import to_rgb_image


class EvalDataError(ValueError):
    """Benchmark data is missing or malformed; the message names the file or sample."""


class UnknownTaskError(EvalDataError, KeyError):
    """A task name that is not registered (a KeyError for lookups, a user error for the CLI)."""

    __str__ = Exception.__str__  # the message as written, not KeyError's quoted repr


@dataclass
class Record:
    """One evaluation question.

    The image is given lazily as encoded bytes, a file path or an already decoded PIL image, and
    decoded in DataLoader workers (``load_image``). ``answers`` are the gold answers as strings;
    ``meta`` holds whatever else scoring needs (ChartQA split, OCRBench dataset, points, ...).
    """

    id: str
    question: str
    answers: list[str]
    image_bytes: bytes | None = None
    image_path: str | None = None
    image: Image.Image | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file the record came from, for error messages
    # several images asked about together (MP-DocVQA's pages, MuirBench's image list), in order:
    # each an HF image cell ({bytes, path}), bytes, a path or a PIL image; None for one image
    images: list[Any] | None = None

    def load_visual(self) -> Image.Image | list[Image.Image]:
        """What the question is asked about: the one image, or the list of ``images``."""
        if self.images is None:
            return self.load_image()
        return [self.page(k).load_image() for k in range(len(self.images))]

    def page(self, k: int) -> Record:
        """Image ``k`` of a multi-image record as a one-image record (for decoding and errors)."""
        where = f"{self.id} (image {k + 1} of {len(self.images or [])})"
        return Record(
            id=where,
            question="",
            answers=[],
            source=self.source,
            **image_fields(self.images[k], self.source, where),
        )

    def load_image(self) -> Image.Image:
        """The RGB image; raises ``EvalDataError`` naming the sample and file when it cannot."""
        import io

        where = f"sample {self.id!r}" + (f" in {self.source}" if self.source else "")
        try:
            if self.image is not None:
                return to_rgb_image(self.image)
            if self.image_bytes is not None:
                with Image.open(io.BytesIO(self.image_bytes)) as im:
                    im.load()
                    return to_rgb_image(im)
            if self.image_path is not None:
                with Image.open(self.image_path) as im:
                    im.load()
                    return to_rgb_image(im)
        except FileNotFoundError:
            raise EvalDataError(f"{where}: image file not found: {self.image_path}") from None
        except Exception as e:  # PIL raises many types for bad bytes
            raise EvalDataError(f"{where}: the image cannot be decoded ({type(e).__name__}: {e})") from None
        raise EvalDataError(f"{where}: has no image (no bytes, no path); check the data's image column")


Scorer = Callable[[str, Record, bool], dict[str, float]]  # (raw response, record, molmo) -> metrics
Loader = Callable[[str, int | None], list[Record]]  # (path or hub id, limit) -> records


def mean_aggregate(per_sample: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the samples that report it."""
    keys: dict[str, list[float]] = {}
    for scores in per_sample:
        for k, v in scores.items():
            keys.setdefault(k, []).append(float(v))
    return {k: float(statistics.fmean(v)) for k, v in keys.items()}


@dataclass(frozen=True)
class Task:
    """A benchmark: data, prompt, generation length and scoring.

    ``prompt(record, molmo)`` builds the question text (lmms-eval's default prompt, or with
    ``molmo=True`` the bare question for Molmo's style prefix, which the processor adds);
    ``score(raw_response, record, molmo)`` returns this sample's metrics from the raw response
    (each task applies lmms-eval's cleaning in the reference order, plus Molmo's ``Answer:`` rule
    when ``molmo``). ``primary`` names the headline metric.
    """

    name: str
    load: Loader
    prompt: Callable[[Record, bool], str]
    score: Scorer
    primary: str
    max_new_tokens: int
    default_data: str | None = None  # hub id used when the user gives no path
    split: str | None = None
    # task name handed to the Predictor with ``molmo_style`` (the processor then writes ``{name}: ``
    # before the question when the model was trained with style prefixes); the names are the
    # ``task`` values of our training shards (chart_qa, doc_qa, vqa, counting, pointing, clock)
    molmo_style: str | None = None
    aggregate: Callable[[list[dict[str, float]]], dict[str, float]] = mean_aggregate
    description: str = ""


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task to the registry; a name can be registered once only."""
    if task.name in TASKS:
        raise ValueError(
            f"task {task.name!r} is registered twice (eval/tasks/{task.name}.py and another file)"
        )
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name``; the error lists the valid names."""
    import eval.tasks  # noqa: F401  (imports every benchmark file, which registers them)

    if name not in TASKS:
        raise UnknownTaskError(f"unknown eval task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def image_fields(value: Any, source: str, row_id: str) -> dict[str, Any]:
    """Record image keyword arguments from an HF image cell: ``{bytes, path}``, bytes, a path or PIL."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"image_bytes": value["bytes"]}
        if value.get("path"):
            p = Path(value["path"])
            if not p.is_absolute() and not p.exists() and Path(source).exists():
                p = Path(source).parent / p
            return {"image_path": str(p)}
    elif isinstance(value, (bytes, bytearray)):
        return {"image_bytes": bytes(value)}
    elif isinstance(value, str) and value:
        return {"image_path": value}
    elif isinstance(value, Image.Image):
        return {"image": value}
    raise EvalDataError(f"sample {row_id!r} in {source}: missing image (the image cell is {value!r:.80})")
