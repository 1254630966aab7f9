"""Run benchmarks on a model: batched greedy answers, cached per sample, scored, reported.

    evaluate("runs/x/checkpoint", ["chartqa", "docvqa"], "out/x", data={"chartqa": "/data/ChartQA"})

Per task: load records -> (this rank's share) -> skip those already in the prediction cache ->
decode images and ``encode`` in DataLoader workers -> greedy answers in the main process -> append
them to ``out/predictions/{task}.jsonl`` (flushed, fsynced) -> score every record -> results. A
``Predictor`` generates through the serving engine (``mmsmall.serve.engine``): up to ``batch_size``
prompts in flight, an answer leaves the running batch the step it ends and the next prompt joins;
any other ``Answerer`` answers static batches (``collate``, then ``answer``).
A killed run rerun with the same ``out`` generates only what is missing, and its final scores are
those an uninterrupted run gives. Under torchrun each rank takes every ``world``-th record and
writes its own cache file; rank 0 reads them all and scores.

The model is driven through three methods (``Answerer``): an mmsmall ``Predictor`` has them; any
other model with ``predict`` (``PredictorLike``) gets them from ``PredictAdapter``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .fingerprint import data_fingerprint, model_fingerprint
from .report import write_reports
from .tasks.base import EvalDataError, Record, Task, get_task

log = logging.getLogger("eval")

BLIND_GREY = (128, 128, 128)
CONVENTION = "lmms-eval 0.7.3 (reasoning tags stripped, responses stripped)"


@runtime_checkable
class PredictorLike(Protocol):
    """What the runner needs from a model: ``mmsmall.inference.predictor.Predictor`` has this shape.

    ``predict`` answers each (image, question) pair greedily; batch composition must not change
    the answers (left padding), so cached and fresh predictions agree.
    """

    def predict(
        self,
        images: list[Image.Image | None],
        questions: list[str],
        max_new_tokens: int,
        task: str | None = None,
    ) -> list[str]: ...


@runtime_checkable
class Answerer(Protocol):
    """What the runner drives: ``encode`` one (image, prompt) and ``collate`` a batch in a data
    worker, ``answer`` the batch (greedily) in the main process. ``Predictor`` is one: its
    ``predict`` runs the same three steps, so the answers are its answers."""

    def encode(self, image: Image.Image | None, question: str, task: str | None = None) -> Any: ...

    def collate(self, examples: Sequence[Any]) -> Any: ...

    def answer(self, batch: Any, max_new_tokens: int = 32) -> list[str]: ...


class PredictAdapter:
    """The ``Answerer`` of a model that only has ``predict``: the workers decode the image only,
    a batch is the list of (image, question, task), and ``answer`` calls ``predict`` on it."""

    def __init__(self, predictor: PredictorLike):
        self.predictor = predictor

    def encode(self, image: Image.Image | None, question: str, task: str | None = None) -> tuple:
        return image, question, task

    def collate(self, examples: Sequence[tuple]) -> list[tuple]:
        return list(examples)

    def answer(self, batch: list[tuple], max_new_tokens: int = 32) -> list[str]:
        images, questions, tasks = (list(x) for x in zip(*batch))
        return self.predictor.predict(images, questions, max_new_tokens=max_new_tokens, task=tasks[0])


def as_answerer(predictor: PredictorLike | Answerer) -> Answerer:
    return predictor if isinstance(predictor, Answerer) else PredictAdapter(predictor)


def load_predictor(
    model: str | os.PathLike | PredictorLike,
    device: str | None = None,
    dtype: str = "fp32",
    max_crops: int | None = None,
) -> PredictorLike:
    """A Predictor from a checkpoint / export folder, or the given predictor object unchanged.

    ``device`` None: this rank's GPU when there is one, else the CPU. The Predictor picks the
    prompt format from the checkpoint (``model.prompt``: ours, or its own chat template).
    """
    if isinstance(model, PredictorLike):
        return model
    from mmsmall.inference.predictor import Predictor

    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    return Predictor(str(model), device=device, dtype=dtype, max_crops=max_crops)


def model_settings(predictor: PredictorLike) -> dict[str, Any]:
    """What about the model changes a score besides its weights: prompt format, crops, dtype, library."""
    import transformers

    return {
        "prompt_format": getattr(predictor, "prompt_format", None),
        "point_format": getattr(predictor, "point_format", None),  # the pointing text it trained in
        "max_crops": getattr(predictor, "max_crops", None),
        "dtype": getattr(predictor, "dtype", None),
        "transformers": transformers.__version__,
    }


# ----------------------------------------------------------------------------- distributed


def _dist() -> tuple[int, int]:
    """(rank, world size); initializes the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------- data


class _ImageDataset(Dataset):
    """Decodes one record's image (or its stand-in) and encodes it with its prompt
    (``Answerer.encode``) in a DataLoader worker.

    The stand-in of the blind baseline is a mid-grey image of the same size; with ``donors``
    (record id -> another record of the task) the question is asked about the donor's image,
    while the size reported for scoring stays the record's own.
    Items are ``(index, (width, height), encoded)``, or ``(index, None, error)``.
    """

    def __init__(
        self,
        records: list[Record],
        blind: bool,
        prompts: dict[str, str],
        answerer: Answerer,
        style: str | None,
        donors: dict[str, Record] | None = None,
    ):
        self.records, self.blind, self.prompts, self.donors = (
            records,
            blind,
            prompts,
            donors,
        )
        self.answerer, self.style = answerer, style

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, tuple[int, int] | None, Any]:
        rec = self.records[i]
        try:
            image = rec.load_visual()  # one image, or the list of a multi-image question
            size = (image[0] if isinstance(image, list) else image).size
            if self.donors is not None:  # the image-reliance baseline: another sample's image(s)
                image = self.donors[rec.id].load_visual()
        except EvalDataError as e:  # raised in the main process (``_raise_bad``), not as a worker traceback
            return i, None, str(e)
        if self.blind:  # the blind baseline: same size(s), no content
            grey = [
                Image.new("RGB", im.size, BLIND_GREY)
                for im in (image if isinstance(image, list) else [image])
            ]
            image = grey if isinstance(image, list) else grey[0]
        return i, size, self.answerer.encode(image, self.prompts[rec.id], task=self.style)


def other_image_donors(records: list[Record]) -> dict[str, Record]:
    """Record id -> the record whose image its question is asked about in the ``other_images``
    baseline: the one half the task away (a fixed derangement, the same on every rank and rerun;
    half-way rather than the neighbour, since benchmarks list several questions of one image in a
    row)."""
    n = len(records)
    if n < 2:
        raise EvalDataError("other_images needs at least 2 samples per task")
    return {r.id: records[(k + n // 2) % n] for k, r in enumerate(records)}


class _Collate:
    """A batch of dataset items -> ``([(index, size)], Answerer.collate(...))``, in the worker; a
    batch with an unreadable image is passed on as is, for the main process to report."""

    def __init__(self, answerer: Answerer):
        self.answerer = answerer

    def __call__(self, items: list) -> tuple[list, Any]:
        if any(size is None for _, size, _ in items):
            return items, None
        return [(i, size, None) for i, size, _ in items], self.answerer.collate([ex for _, _, ex in items])


def _raise_bad(batch: list, task: Task) -> None:
    """The first item whose image could not be read, as one clear error from the main process."""
    for _, size, error in batch:
        if size is None:
            raise EvalDataError(
                f"task {task.name}: {error}; restore or replace the file, or remove the sample from the data"
            )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers preprocess; the main process owns the compute threads


def _unique_ids(records: list[Record]) -> list[Record]:
    """Make record ids unique (``id#2`` for a repeat) so the cache can key on them."""
    seen: dict[str, int] = {}
    for r in records:
        n = seen.get(r.id, 0)
        seen[r.id] = n + 1
        if n:
            r.id = f"{r.id}#{n + 1}"
    return records


# ----------------------------------------------------------------------------- cache


def _cache_files(pred_dir: Path, task: str) -> list[Path]:
    return sorted([*pred_dir.glob(f"{task}.jsonl"), *pred_dir.glob(f"{task}.rank*.jsonl")])


def read_cache(pred_dir: Path, task: str, settings: dict[str, Any]) -> dict[str, dict]:
    """Cached predictions by record id; a torn last line (a killed write) is ignored.

    Raises when the cache was made with other settings (prompt style, token budget, blind), so
    a reused output folder never mixes answers from different runs silently.
    """
    cached: dict[str, dict] = {}
    for f in _cache_files(pred_dir, task):
        lines = f.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):  # torn write from a killed run: regenerate that sample
                    continue
                raise EvalDataError(
                    f"{f}:{n}: malformed prediction line; delete the file to regenerate"
                ) from None
            got = {k: entry.get(k) for k in settings}
            if got != settings:
                changed = ", ".join(
                    f"{k} {got[k]!r} -> {settings[k]!r}" for k in settings if got[k] != settings[k]
                )
                raise EvalDataError(
                    f"{f}: predictions were made with other settings ({changed}); "
                    "use another --out folder or delete the file"
                )
            cached[entry["id"]] = entry
    return cached


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a write interrupted by a kill) so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


# ----------------------------------------------------------------------------- main loop


def _generate(
    answerer: Answerer,
    task: Task,
    records: list[Record],
    prompts: dict[str, str],
    cache_file: Path,
    settings: dict[str, Any],
    *,
    batch_size: int,
    num_workers: int,
    blind: bool,
    molmo: bool,
    show_progress: bool,
    donors: dict[str, Record] | None = None,
) -> int:
    """Answer ``records`` and append them to ``cache_file``; returns the number generated."""
    if not records:
        return 0
    style = task.molmo_style if molmo else None
    engine = _engine_of(answerer, batch_size)
    loader = DataLoader(
        _ImageDataset(records, blind, prompts, answerer, style, donors),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=list if engine is not None else _Collate(answerer),
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
    )
    from tqdm import tqdm

    bar = tqdm(
        total=len(records),
        desc=task.name,
        unit="q",
        disable=not show_progress,
        leave=False,
    )
    _drop_torn_tail(cache_file)
    with (
        bar,
        open(cache_file, "a", encoding="utf-8") as f,
    ):  # the bar is cleared before any error shows
        if engine is not None:
            _engine_answers(engine, loader, records, task, f, settings, batch_size, bar)
            return len(records)
        for items, batch in loader:
            _raise_bad(items, task)
            answers = answerer.answer(batch, max_new_tokens=settings["max_new_tokens"])
            if len(answers) != len(items):
                raise RuntimeError(f"predictor returned {len(answers)} answers for a batch of {len(items)}")
            for (i, size, _), a in zip(items, answers):
                entry = {
                    "id": records[i].id,
                    "response": a if isinstance(a, str) else str(a),
                    "size": list(size),
                }
                f.write(json.dumps({**entry, **settings}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(items))
    return len(records)


def _engine_of(answerer: Answerer, batch_size: int):
    """The continuous-batching :class:`~mmsmall.serve.engine.Engine` over an mmsmall ``Predictor``
    (``batch_size`` prompts in flight), or None where the static batches of ``answer`` are kept:
    another ``Answerer``, a ``Predictor`` subclass that changes how it answers, or an LLM whose
    cache the engine cannot stack (sliding-window layers)."""
    from mmsmall.inference.predictor import Predictor

    if not isinstance(answerer, Predictor) or any(
        getattr(type(answerer), m) is not getattr(Predictor, m)
        for m in ("encode", "collate", "answer", "text")
    ):
        return None
    from mmsmall.serve.engine import Engine

    try:
        return Engine(answerer, max_batch=batch_size, max_queue=batch_size, max_prefill=batch_size)
    except NotImplementedError as e:
        log.info("static batches: %s", e)
        return None


def _engine_answers(
    engine, loader, records: list[Record], task: Task, f, settings: dict, batch_size: int, bar
):
    """Greedy answers through the engine, driven in this thread: encoded prompts (from the loader's
    workers) join the running batch as soon as a row is free, each answer is written (flushed,
    fsynced) at the step it ends, so a prompt never waits for a longer answer of its batch."""
    from mmsmall.serve.engine import Request

    items = (item for chunk in loader for item in chunk)
    done: list[Request] = []
    in_flight, more = 0, True
    model = engine.model
    was_training = model.training
    model.eval()  # generation without dropout; a caller's training model gets its mode back
    try:
        while more or in_flight:
            while more and in_flight < batch_size:
                item = next(items, None)
                if item is None:
                    more = False
                    break
                _raise_bad([item], task)
                i, size, example = item
                request = Request(
                    example, max_new_tokens=settings["max_new_tokens"], on_done=done.append, tag=(i, size)
                )
                engine.submit(engine.fit(request))
                in_flight += 1
            engine.step()
            if not done:
                continue
            for r in done:
                if r.error is not None:
                    raise r.error
                i, size = r.tag
                entry = {"id": records[i].id, "response": engine.text(r), "size": list(size)}
                f.write(json.dumps({**entry, **settings}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(done))
            in_flight -= len(done)
            done.clear()
    finally:
        model.train(was_training)


def _score(
    task: Task,
    records: list[Record],
    cached: dict[str, dict],
    molmo: bool,
    samples_file: Path,
) -> dict:
    per_sample = []
    with open(samples_file, "w", encoding="utf-8") as f:
        for r in records:
            entry = cached[r.id]
            if entry.get("size") is not None:
                r.meta.setdefault("size", entry["size"])
            scores = task.score(entry["response"], r, molmo)
            per_sample.append(scores)
            line = {
                "id": r.id,
                "response": entry["response"],
                "answers": r.answers,
                "scores": scores,
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    metrics = task.aggregate(per_sample)
    return metrics


@dataclass
class TaskData:
    """A task's records and what loading them skipped (corrupt samples, by reason) or noted."""

    records: list[Record]
    skipped: dict[str, int] | None = None
    note: str | None = None


def load_task(task: Task, path: str, limit: int | None) -> TaskData:
    """``task.load`` with unique ids; the loaders' skip counts and note (left on the first
    record's ``meta``) become fields here, the one place that reads them."""
    records = _unique_ids(task.load(str(path), limit))
    if not records:
        raise EvalDataError(f"task {task.name}: {path} holds no samples")
    return TaskData(records, records[0].meta.pop("skipped", None), records[0].meta.pop("note", None))


@dataclass
class _Run:
    """One ``evaluate`` call: the model, where it writes, and the options every task shares."""

    answerer: Answerer
    out: Path
    rank: int
    world: int
    settings: dict[str, Any]  # the cache key parts every task shares
    batch_size: int
    num_workers: int
    blind: bool
    other_images: bool
    molmo_style: bool
    show_progress: bool


def _run_task(run: _Run, task: Task, path: str, limit: int | None, max_new_tokens: int | None) -> dict | None:
    """Generate what the cache lacks (this rank's share), then on rank 0 score: the task's
    entry of the results (``{"submission": ...}`` for a test split without answers)."""
    t0 = time.time()
    data = load_task(task, path, limit)
    records = data.records
    prompts = {r.id: task.prompt(r, run.molmo_style) for r in records}
    settings = {
        **run.settings,
        "max_new_tokens": int(max_new_tokens or task.max_new_tokens),
    }
    settings["data"] = data_fingerprint(records, prompts)  # with the weights: what changes answers
    pred_dir = run.out / "predictions"
    cached = read_cache(pred_dir, task.name, settings)
    todo = [r for r in records[run.rank :: run.world] if r.id not in cached]
    cache_file = pred_dir / (f"{task.name}.jsonl" if run.world == 1 else f"{task.name}.rank{run.rank}.jsonl")
    pred_dir.mkdir(parents=True, exist_ok=True)  # made once a task's data loaded: a failed start leaves none
    (run.out / "samples").mkdir(parents=True, exist_ok=True)
    if run.rank == 0:
        log.info(
            "%s: %d samples (%d cached) from %s",
            task.name,
            len(records),
            len(records) - len(todo),
            path,
        )
    n_new = _generate(
        run.answerer, task, todo, prompts, cache_file, settings,
        batch_size=run.batch_size, num_workers=run.num_workers, blind=run.blind, molmo=run.molmo_style,
        show_progress=run.show_progress, donors=other_image_donors(records) if run.other_images else None,
    )  # fmt: skip
    gen_seconds = time.time() - t0
    _barrier(run.world)
    if run.rank != 0:
        return None
    cached = read_cache(pred_dir, task.name, settings)
    missing = [r.id for r in records if r.id not in cached]
    if missing:
        raise RuntimeError(f"task {task.name}: no prediction for {len(missing)} samples, e.g. {missing[:3]}")
    from .submission import is_test_split, write_submission

    if is_test_split(records):  # no answers: the benchmark's server scores it
        sub = write_submission(task.name, records, cached, run.molmo_style, run.out)
        log.info("%s: no answers in %s; wrote %s for the test server", task.name, path, sub)
        return {"submission": {"file": sub.name, "n": len(records), "data": str(path)}}
    metrics = _score(
        task,
        records,
        cached,
        run.molmo_style,
        run.out / "samples" / f"{task.name}.jsonl",
    )
    if data.note:
        log.warning("%s: %s", task.name, data.note)
    log.info("%s: %s = %.2f", task.name, task.primary, 100.0 * metrics[task.primary])
    return {
        "primary": task.primary, "score": 100.0 * metrics[task.primary], "metrics": metrics,
        "n": len(records), "n_generated": n_new, "seconds": round(gen_seconds, 3), "data": str(path),
        "max_new_tokens": settings["max_new_tokens"],
        **({"skipped_corrupt": data.skipped} if data.skipped else {}), **({"note": data.note} if data.note else {}),
    }  # fmt: skip


def evaluate(
    model: str | os.PathLike | PredictorLike,
    tasks: Sequence[str],
    out: str | os.PathLike,
    batch_size: int = 8,
    limit: int | None = None,
    data: dict[str, str] | None = None,
    blind: bool = False,
    max_new_tokens: int | None = None,
    *,
    other_images: bool = False,
    num_workers: int = 2,
    molmo_style: bool = False,
    show_progress: bool = True,
    device: str | None = None,
    dtype: str = "fp32",
    max_crops: int | None = None,
) -> dict:
    """Evaluate ``model`` on ``tasks``; writes predictions, results.json and results.md under ``out``.

    model: a checkpoint / export folder, or an object with ``encode`` / ``collate`` / ``answer``
    (``Answerer``) or with ``predict`` (``PredictorLike``, run through ``PredictAdapter``).
    data: task name -> local path or hub id; tasks not named use their default hub dataset.
    limit: the first ``limit`` samples of each task. blind: every image replaced by a mid-grey
    one of the same size. other_images: each question asked about another sample's image of the
    same task (``other_image_donors``): what the model scores when it cannot see the right image,
    the baseline that measures its reliance on the image. max_new_tokens: overrides each task's
    pinned budget. molmo_style: ask the bare question with the Molmo task style and keep the text
    after ``Answer:``. device / dtype (fp32, bf16, fp16) / max_crops: how a model folder is loaded
    and its images cut. Returns the results dict (on rank 0; other ranks return ``{}``).
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    from mmsmall.config import ConfigError
    from mmsmall.inference.predictor import check_options

    check_options(
        batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens, num_workers=num_workers,
        max_crops=max_crops,
    )  # fmt: skip
    if blind and other_images:
        raise ConfigError("--blind and --other-images are two baselines: choose one")
    data = dict(data or {})
    specs = [get_task(t) for t in tasks]
    unknown = sorted(set(data) - {t.name for t in specs})
    if unknown:
        raise ConfigError(f"--data names task(s) {unknown} that are not being run ({', '.join(tasks)})")
    rank, world = _dist()
    predictor = load_predictor(model, device=device, dtype=dtype, max_crops=max_crops)
    model_name = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    setup = model_settings(predictor)
    style = "molmo" if molmo_style else "lmms-eval"
    results: dict[str, Any] = {
        "model": model_name, "convention": CONVENTION, "prompt_style": style, "blind": blind,
        "other_images": other_images, "limit": limit, **setup, "tasks": {},
    }  # fmt: skip
    shared = {
        "model": model_name,
        "blind": bool(blind),
        "other_images": bool(other_images),
        "prompt_style": style,
    }
    shared |= {k: setup[k] for k in ("prompt_format", "max_crops", "dtype")} | {
        "weights": model_fingerprint(model)
    }
    run = _Run(
        as_answerer(predictor), Path(out), rank, world, shared, batch_size, num_workers, blind, other_images,
        molmo_style, show_progress and rank == 0,
    )  # fmt: skip
    for task in specs:
        path = data.get(task.name) or task.default_data
        if path is None:
            raise EvalDataError(
                f"task {task.name}: no default dataset; pass its data: --data {task.name}=PATH"
            )
        entry = _run_task(run, task, path, limit, max_new_tokens)
        if entry is not None and "submission" in entry:
            results.setdefault("submissions", {})[task.name] = entry["submission"]
        elif entry is not None:
            results["tasks"][task.name] = entry
    if rank != 0:
        return {}
    write_reports(results, out)
    return results
