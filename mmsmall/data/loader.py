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
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mmsmall.data.packing import Batch, Example, Packer
from mmsmall.data.shards import Sample, SampleStream, sample_id

log = logging.getLogger(__name__)


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
    """Response-token dropout: each trained label is masked to -100 with probability ``p``."""
    if p <= 0:
        return labels
    drop = (torch.rand(labels.shape, generator=gen) < p) & (labels != -100)  # (T,)
    return labels.masked_fill(drop, -100)


class TrainData:
    """Endless, resumable micro-batches for one rank."""

    def __init__(self, cfg: Any, processor: Any, pad_id: int, *, rank: int = 0, world_size: int = 1):
        self.cfg = cfg  # RunConfig
        self.processor = processor
        self.counters: dict[str, int] = {}
        self.stream = SampleStream(
            cfg.data.train, seed=cfg.seed, rank=rank, world_size=world_size, counters=self.counters
        )
        self.packer = Packer(
            cfg.data.seq_len,
            cfg.train.micro_batch_size,
            pad_id,
            pack=cfg.data.pack,
            counters=self.counters,
        )

    def encode(self, sample: Sample) -> Example:
        d = self.cfg.data
        sid = sample_id(sample)
        with seeded_rng(self.cfg.seed, *sample["ref"]) as gen:
            ex = self.processor.encode(
                sample["image"],
                conversations_of(sample, d.max_conversations),
                task=sample["json"].get("task"),
                train=True,
                sample_id=sid,
            )
            ex["labels"] = drop_responses(ex["labels"], d.response_dropout, gen)
        ex["sample_id"] = sid
        ex["ref"] = tuple(sample["ref"])
        return ex

    def _pull(self) -> Example:
        while True:
            sample = next(self.stream)
            try:
                return self.encode(sample)
            except ValueError as e:  # a sample the processor cannot encode: skip, count, go on
                self.counters["encode_error"] = self.counters.get("encode_error", 0) + 1
                log.warning("skipping sample %s: %s", sample_id(sample), e)

    def next_batch(self) -> Batch:
        return self.packer.next_batch(self._pull)

    def state_dict(self) -> dict:
        return {
            "stream": self.stream.state_dict(),
            "pending": [list(r) for r in self.packer.pending_refs()],
            "min_len": self.packer.min_len,
        }

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        pending = []
        for ref in state["pending"]:
            sample = self.stream.sample_at(ref)
            if sample is None:
                raise RuntimeError(
                    f"data position: held sample {ref} no longer decodes; did the shards change?"
                )
            pending.append(self.encode(sample))
        self.packer.pending = pending
        self.packer.min_len = int(state["min_len"])
