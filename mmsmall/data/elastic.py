"""A data position saved by N ranks, continued by M: nothing trained twice, nothing left out.

Each rank of a run reads its own shards of every epoch (``SampleStream``), so a rank's position
means nothing to a run with another world size. The saved positions of *all* N ranks say
exactly which samples were trained: per entry, every sample of the shards a rank finished in
the epochs since the slowest rank's (or the oldest held example's), the first ``sample_pos`` of the shard it is in, minus the
examples its packer still held (pulled, not yet trained). ``elastic_stream_state`` turns that
into the state of one of the M new ranks: each entry restarts at the slowest old rank's epoch,
split over M ranks as usual, with the trained samples marked ``done`` so the new stream passes
over them; the held examples come round again because they are not marked.

Marks are keyed ``"entry/epoch/shard"`` (the shard's index in the entry, the same on every world
size) and hold positions in the shard's sample permutation, or ``"all"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmsmall.data.shards import SampleStream, read_shard_members


def _mark(done: dict[str, Any], key: str, positions: Any) -> None:
    if done.get(key) == "all":
        return
    if positions == "all":
        done[key] = "all"
    else:
        done.setdefault(key, set()).update(positions)


def _start_epochs(n_entries: int, states: list[dict], pending: list[list]) -> list[int]:
    """Per entry, the first epoch the new ranks read: the slowest old rank's, or older where a
    held example comes from an older epoch."""
    start = [min(int(s["entries"][i]["epoch"]) for s in states) for i in range(n_entries)]
    for refs in pending:
        for ref in refs:
            start[int(ref[0])] = min(start[int(ref[0])], int(ref[1]))
    return start


def trained_marks(stream: SampleStream, states: list[dict], pending: list[list]) -> dict[str, Any]:
    """The samples the ranks of ``states`` (their stream states, rank order) trained, as marks."""
    world = len(states)
    start = _start_epochs(len(stream.entries), states, pending)
    counts: dict[tuple[int, int], int] = {}

    def count(i: int, shard_idx: int) -> int:  # samples in a shard (read only where needed)
        if (i, shard_idx) not in counts:
            counts[(i, shard_idx)] = len(read_shard_members(stream.entries[i].shards[shard_idx]))
        return counts[(i, shard_idx)]

    done: dict[str, Any] = {}
    for s in states:  # marks carried from an earlier elastic resume
        for key, positions in s.get("done", {}).items():
            i, epoch, _ = (int(x) for x in key.split("/"))
            if epoch >= start[i]:
                _mark(done, key, positions)
    for r, s in enumerate(states):
        for i, cur in enumerate(s["entries"]):
            epoch_now, shard_pos, sample_pos = (
                int(cur["epoch"]),
                int(cur["shard_pos"]),
                int(cur["sample_pos"]),
            )
            for epoch in range(start[i], epoch_now + 1):
                shard_ids, strided = stream._epoch_shards(i, epoch, r, world)
                finished = shard_ids if epoch < epoch_now else shard_ids[:shard_pos]
                for sid in finished:
                    key = f"{i}/{epoch}/{sid}"
                    _mark(done, key, range(r, count(i, sid), world) if strided else "all")
                if epoch == epoch_now and shard_pos < len(shard_ids):
                    key = f"{i}/{epoch}/{shard_ids[shard_pos]}"
                    _mark(done, key, range(r, sample_pos, world) if strided else range(sample_pos))
    for r, refs in enumerate(pending):  # pulled by a packer but not trained: not done
        for i, epoch, shard_pos, pos in (tuple(int(x) for x in ref) for ref in refs):
            sid = stream._epoch_shards(i, epoch, r, world)[0][shard_pos]
            key = f"{i}/{epoch}/{sid}"
            if done.get(key) == "all":
                done[key] = set(range(count(i, sid)))
            done.get(key, set()).discard(pos)
    return {k: v if v == "all" else sorted(v) for k, v in done.items()}


def elastic_stream_state(stream: SampleStream, states: list[dict], pending: list[list]) -> dict:
    """The stream state for ``stream``'s rank (of its world size) that continues the run whose
    N ranks saved ``states`` with ``pending`` held examples each."""
    if len(states) != states[0]["world_size"] or len(states[0]["entries"]) != len(stream.entries):
        raise ValueError(
            f"data position: {len(states)} rank states for a run of {states[0]['world_size']} ranks and "
            f"{len(states[0]['entries'])} mixture entries (now {len(stream.entries)}); resume with the "
            "same data.train"
        )
    start = _start_epochs(len(stream.entries), states, pending)
    counters: dict[str, int] = {}
    for r, s in enumerate(states):  # old rank r's skip counts go to new rank r % M (totals kept)
        if r % stream.world_size == stream.rank:
            for k, v in s.get("counters", {}).items():
                counters[k] = counters.get(k, 0) + v
    rng = np.random.default_rng([stream.seed, stream.rank, 7919, len(states)])  # this world's own draws
    return {
        "seed": stream.seed,
        "rank": stream.rank,
        "world_size": stream.world_size,
        "entries": [
            {"name": e.name, "epoch": start[i], "shard_pos": 0, "sample_pos": 0}
            for i, e in enumerate(stream.entries)
        ],
        "rng": rng.bit_generator.state,
        "counters": counters,
        "done": trained_marks(stream, states, pending),
    }
