"""The training data path of one rank: shard stream -> Processor Examples -> packed micro-batches.

``TrainData`` ties ``SampleStream`` (shards.py), the Processor and the ``Packer`` (packing.py)
together and owns the data position a checkpoint saves: the stream's cursors plus references to
the examples the packer still holds. Every example is encoded under random state seeded from
``(seed, sample ref)`` — the Processor's training-time randomness and response-token dropout
— so re-encoding a held example after a resume gives the same tensors, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmsmall.config import LOSS_WEIGHTINGS
from mmsmall.data.packing import Batch, Example, Packer
from mmsmall.data.shards import Sample, SampleStream, log_skip, open_image, sample_id
from mmsmall.processing.batch import IGNORE_INDEX, count_targets, label_weights
from mmsmall.processing.crops import normalize_pixels

log = logging.getLogger(__name__)


class NoUsableData(RuntimeError):
    """Every sample of the training data is skipped (too long, or the processor refuses it)."""


@contextlib.contextmanager
def seeded_rng(*seed: int) -> Iterator[torch.Generator]:
    """Run a block under python / numpy / torch random state seeded from ``seed``; restore after."""
    s = int(np.random.SeedSequence(list(seed)).generate_state(1)[0])
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        try:
            yield torch.Generator().manual_seed(s)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def conversations_of(sample: Sample, max_conversations: int) -> list[list[dict]]:
    """The conversations of a shard sample: ``json["conversations"]`` (several annotations of the
    image, kept up to ``max_conversations``) or ``json["messages"]`` as one."""
    meta = sample["json"]
    if meta.get("conversations"):
        convs = meta["conversations"][: max(1, max_conversations)]
    elif meta.get("messages"):
        convs = [meta["messages"]]
    else:
        raise ValueError(
            f"sample {sample_id(sample)}: json has neither 'messages' nor 'conversations'; "
            "see the shard schema in DESIGN.md"
        )
    return convs


def drop_responses(labels: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Response-token dropout: each trained label is masked to IGNORE_INDEX with probability ``p``."""
    if p <= 0:
        return labels
    drop = (torch.rand(labels.shape, generator=gen) < p) & (labels != IGNORE_INDEX)  # (T,)
    return labels.masked_fill(drop, IGNORE_INDEX)


# What a run counts about its data (TrainData.counts), summed over data workers and ranks and
# logged: shard members skipped (shards.py), samples the processor refused or that do not fit,
# conversations (and their answer tokens) dropped to fit data.seq_len, and samples that came
# twice inside one step (the data holds fewer samples than a step takes).
COUNTS = (
    "bad_image", "bad_json", "missing_json", "duplicate_member", "unreadable_tar", "encode_error",
    "too_long", "dropped_conversations", "truncated_targets", "repeated_samples", "other",
)  # fmt: skip


def encode_sample(
    processor: Any,
    sample: Sample,
    seed: int,
    max_conversations: int,
    response_dropout: float,
    pixel_bytes: bool = True,
) -> Example:
    """A shard sample -> Example, under random state seeded from ``(seed, sample ref)``. What the
    processor counted while encoding it (``Processor.counters``) rides along in ``ex["counts"]``,
    so counts made in a worker process reach the trainer.

    Its ``pixel_values`` are uint8, the crops before ``(x - mean) / std`` (``Processor.encode``
    with ``pixel_bytes=True``; ``pixel_bytes=False``: float32, the Processor's default): 4x fewer bytes to send from a worker and to hold in the packer;
    ``TrainData.next_batch`` normalizes the batch's crops into float32, bit for bit the values
    the Processor's default gives."""
    sid = sample_id(sample)
    before = dict(getattr(processor, "counters", {}))
    with seeded_rng(seed, *sample["ref"]) as gen:
        ex = processor.encode(
            sample["image"],
            conversations_of(sample, max_conversations),
            task=sample["json"].get("task"),
            train=True,
            sample_id=sid,
            pixel_bytes=pixel_bytes,
        )
        ex["labels"] = drop_responses(ex["labels"], response_dropout, gen)
    ex["sample_id"] = sid
    ex["ref"] = tuple(sample["ref"])
    after = getattr(processor, "counters", {})
    ex["counts"] = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    return ex


@dataclass(frozen=True)
class Skipped:
    """A drawn sample that gives no example: why (a ``COUNTS`` reason) and the detail to log."""

    reason: str
    detail: str


class ExampleMaker:
    """What happens to one drawn sample, in a data worker or (``num_workers=0``) in the trainer:
    its image bytes are decoded, then it is encoded (``encode_sample``). Returns the Example, or
    ``Skipped`` for a sample the trainer counts and passes over. Its examples' ``pixel_values``
    are uint8 crops (``encode_sample``) unless ``pixel_bytes=False``."""

    def __init__(
        self,
        processor: Any,
        seed: int,
        max_conversations: int,
        response_dropout: float,
        pixel_bytes: bool = True,
    ):
        self.processor = processor
        self.args = (seed, max_conversations, response_dropout, pixel_bytes)

    def __call__(self, sample: Sample) -> Example | Skipped:
        data = sample.get("image_bytes")
        image = sample.get("image")
        if data is not None:
            try:
                image = open_image(data)
            except Exception as e:  # PIL raises many types for bad bytes
                return Skipped("bad_image", f"{type(e).__name__}: {e}")
        sample = {k: v for k, v in sample.items() if k != "image_bytes"} | {"image": image}
        try:
            return encode_sample(self.processor, sample, *self.args)
        except ValueError as e:  # a sample the processor cannot encode
            return Skipped("encode_error", str(e))


@dataclass(frozen=True)
class _WorkerFailed:
    traceback: str


def _exit_with_parent(parent: int) -> None:
    while True:  # a trainer killed with SIGKILL cannot stop its workers; they notice and leave
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _to_wire(out: Example | Skipped) -> Example | Skipped:
    """An example as a worker sends it: its small tensors as numpy arrays, pickled inline; only
    ``pixel_values`` (MBs) goes through shared memory, as torch tensors do (each such tensor
    costs a file-descriptor hand-over between the processes)."""
    if not isinstance(out, dict):
        return out
    return {
        k: v.numpy() if isinstance(v, torch.Tensor) and k != "pixel_values" else v for k, v in out.items()
    }


def _from_wire(out: Any) -> Any:
    if not isinstance(out, dict):
        return out
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in out.items()}


def _worker_main(parent: int, maker: ExampleMaker, inbox: Any, outbox: Any) -> None:
    """A data worker: samples in, examples (or Skipped) out, in order, until it receives None."""
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    while (sample := inbox.get()) is not None:
        try:
            outbox.put(_to_wire(maker(sample)))
        except BaseException:  # anything else is a bug: the trainer re-raises it with this traceback
            outbox.put(_WorkerFailed(traceback.format_exc()))


class WorkerPool:
    """``n`` spawned processes (no fork of a process holding a process group), each owning a copy
    of one ``ExampleMaker``. The k-th sample submitted goes to worker ``k % n``; each call of the
    handle ``submit`` returns gives that sample's result, and handles are called in submission order."""

    def __init__(self, n: int, maker: ExampleMaker):
        ctx = multiprocessing.get_context("spawn")
        self.inbox = [ctx.Queue() for _ in range(n)]
        self.outbox = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(target=_worker_main, args=(os.getpid(), maker, i, o), daemon=True)
            for i, o in zip(self.inbox, self.outbox)
        ]
        for proc in self.procs:
            proc.start()
        self.sent = 0

    def submit(self, sample: Sample) -> Callable[[], Example | Skipped]:
        w = self.sent % len(self.procs)
        self.sent += 1
        self.inbox[w].put(sample)
        return lambda: self._result(w)

    def _result(self, w: int) -> Example | Skipped:
        while True:
            try:
                out = self.outbox[w].get(timeout=2.0)
                break
            except queue.Empty:
                if not self.procs[w].is_alive():
                    raise RuntimeError(
                        f"data worker {w} died (exit code {self.procs[w].exitcode}); out of memory? "
                        "lower data.num_workers or model.image.max_crops"
                    ) from None
        if isinstance(out, _WorkerFailed):
            raise RuntimeError(f"data worker {w} failed:\n{out.traceback}")
        return _from_wire(out)

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)
        for q in self.inbox + self.outbox:
            q.cancel_join_thread()
            q.close()


def batch_counts(batch: dict) -> tuple[int, int]:
    """(target tokens, real tokens) of a micro-batch, read from its host tensors: the targets are
    the model's shifted ones (what the model divides a "mean" loss by)."""
    return int(count_targets(batch["labels"])), int(batch["attention_mask"].sum())


class TrainData:
    """Endless, resumable micro-batches for one rank.

    The stream yields samples with their image still bytes. With ``data.num_workers > 0`` that
    many worker processes decode and encode them (``ExampleMaker``), a few samples ahead of the
    packer and consumed in stream order, so batches are identical to the in-process path. The
    saved position is then the stream's position *before* the first sample drawn ahead but not
    yet consumed, so a resume re-draws exactly those. Whether the data holds anything usable is
    judged in one place, ``_check_progress``, for every sample drawn (skipped ones included).
    """

    def __init__(self, cfg: Any, processor: Any, pad_id: int, *, rank: int = 0, world_size: int = 1):
        d = cfg.data
        self.processor = processor
        self.maker = ExampleMaker(processor, cfg.seed, d.max_conversations, d.response_dropout)
        self.stream = SampleStream(
            d.train, seed=cfg.seed, rank=rank, world_size=world_size, decode_images=False
        )
        self.skipped: dict[str, int] = {}  # encode errors and too-long examples, counted when consumed
        self.packer = Packer(
            d.seq_len, cfg.train.micro_batch_size, pad_id, pack=d.pack, counters=self.skipped
        )
        self.weight_power = LOSS_WEIGHTINGS[cfg.train.loss_weighting]
        self.num_workers = d.num_workers
        self.pool: WorkerPool | None = None
        # drawn ahead for the workers: (stream state before it, sample, its result when called)
        self.ahead: deque[tuple[dict, Sample, Callable[[], Example | Skipped]]] = deque()
        self._accepted_seen, self._unusable_run = 0, {}  # see _check_progress

    @property
    def counters(self) -> dict[str, int]:
        """Skipped samples by reason (corrupt shard members, unusable examples) and the other
        ``COUNTS`` of this rank, since the run began."""
        return {**self.stream.counters, **self.skipped}

    def counts(self) -> list[int]:
        """``counters`` in ``COUNTS`` order (the loop sums them over ranks); a reason not listed
        there is counted under ``other``, never left out of the log."""
        c = self.counters
        return [c.get(k, 0) for k in COUNTS[:-1]] + [sum(n for k, n in c.items() if k not in COUNTS)]

    def count_step(self, sample_ids: list[str]) -> None:
        """Count the samples of one optimizer step (this rank) that came more than once."""
        repeated = len(sample_ids) - len(set(sample_ids))
        if repeated:
            self.skipped["repeated_samples"] = self.skipped.get("repeated_samples", 0) + repeated

    def _next_encoded(self) -> tuple[Sample, Callable[[], Example | Skipped]]:
        if self.num_workers <= 0:
            sample = next(self.stream)
            return sample, lambda: self.maker(sample)
        if self.pool is None:
            self.pool = WorkerPool(self.num_workers, self.maker)
        while len(self.ahead) < 8 * self.num_workers:
            state = self.stream.state_dict()
            sample = next(self.stream)
            result = self.pool.submit(sample) if not sample.get("empty") else (lambda: None)
            self.ahead.append((state, sample, result))
        _, sample, result = self.ahead.popleft()
        return sample, result

    def _check_progress(self, sample: Sample) -> None:
        """Stop once a whole pass over every data entry has yielded no usable example.

        ``_unusable_run`` maps entry -> (first, last) epoch drawn since the packer last took an
        example; a full epoch between them for every entry means every sample was skipped.
        """
        if self.packer.accepted != self._accepted_seen:
            self._accepted_seen, self._unusable_run = self.packer.accepted, {}
        i, epoch = sample["ref"][0], sample["ref"][1]
        first, _ = self._unusable_run.get(i, (epoch, epoch))
        self._unusable_run[i] = (first, epoch)
        spans = self._unusable_run.values()
        if len(self._unusable_run) == len(self.stream.entries) and all(
            last - first >= 2 for first, last in spans
        ):
            raise NoUsableData(
                "a whole pass over data.train gave no usable example; skipped so far: "
                f"{self.counters}. too_long: raise data.seq_len or lower model.image.max_crops; "
                "encode_error, bad_image, bad_json, unreadable_tar: see the warnings above"
            )

    def _pull(self) -> Example:
        while True:
            sample, result = self._next_encoded()
            self._check_progress(sample)
            if sample.get("empty"):  # the stream's marker: an entry read nothing for a whole epoch
                continue
            ex = result()
            if isinstance(ex, Skipped):  # corrupt image or unencodable sample: count, say, go on
                self.skipped[ex.reason] = self.skipped.get(ex.reason, 0) + 1
                log_skip(
                    self.stream.counters, ex.reason, sample.get("shard", "?"), sample_id(sample), ex.detail
                )
                continue
            for k, n in ex.pop("counts", {}).items():
                self.skipped[k] = self.skipped.get(k, 0) + n
            return ex

    def next_batch(self) -> Batch:
        """The next packed micro-batch (docs/INTERFACES.md): its ``pixel_values`` are float32,
        normalized here from the examples' uint8 crops (``encode_sample``) in one pass; a processor
        that normalizes itself (the chat-template one: transformers' processor) gives float32 crops,
        which pass as they are."""
        batch = self.packer.next_batch(self._pull)
        if batch.get("pixel_values") is not None and batch["pixel_values"].dtype == torch.uint8:
            image = self.processor.image_cfg
            batch["pixel_values"] = normalize_pixels(batch["pixel_values"], image.mean, image.std)
        if self.weight_power:  # train.loss_weighting other than "token"
            batch["label_weights"] = label_weights(batch, self.weight_power)
        return batch

    def state_dict(self) -> dict:
        return {
            "stream": self.ahead[0][0] if self.ahead else self.stream.state_dict(),
            "pending": [list(r) for r in self.packer.pending_refs()],
            "min_len": self.packer.min_len,
            "skipped": dict(self.skipped),
        }

    def _drop_ahead(self) -> None:
        """Forget the samples drawn ahead (a new position is loaded): the workers start afresh."""
        self.ahead.clear()
        self.close()

    def load_state_dict(self, state: dict) -> None:
        self._drop_ahead()
        self.stream.load_state_dict(state["stream"])
        pending = []
        for ref in state["pending"]:
            sample = self.stream.sample_at(ref)
            ex = self.maker(sample) if sample is not None else None
            if not isinstance(ex, dict):
                raise RuntimeError(
                    f"data position: held sample {ref} no longer decodes; did the shards change?"
                )
            ex.pop("counts", None)  # counted when it was first drawn
            pending.append(ex)
        self.packer.pending = pending
        self.packer.min_len = int(state["min_len"])
        self.skipped.clear()
        self.skipped.update(state["skipped"])

    def load_elastic(self, states: list[dict]) -> None:
        """Continue from the positions of all N ranks of a run with another world size
        (``elastic.py``): the held examples of every old rank are drawn again by the new ranks."""
        from mmsmall.data.elastic import elastic_stream_state

        self._drop_ahead()
        stream = elastic_stream_state(
            self.stream, [s["stream"] for s in states], [s["pending"] for s in states]
        )
        self.stream.load_state_dict(stream)
        self.packer.pending = []
        self.packer.min_len = min(int(s["min_len"]) for s in states)
        self.skipped.clear()
        for r, s in enumerate(states):  # old rank r's counts go to new rank r % M: totals kept
            if r % self.stream.world_size == self.stream.rank:
                for k, v in s["skipped"].items():
                    self.skipped[k] = self.skipped.get(k, 0) + v

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
