"""A data position saved by N ranks continues on M (mmsmall/data/elastic.py), without DeepSpeed.

Streams of an N-rank run draw unevenly (packing takes more samples on one rank than another) and
hold a few drawn examples back (the packer's pending ones); their states then seed M new
streams. Over the epoch the run was in, every sample is trained exactly once: by an old rank
(drawn, not held) or by a new one. 2 -> 1, 2 -> 3 (one entry then has fewer shards than ranks:
strided samples), and 2 -> 3 -> 1 (marks carried through a second resume).
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from test_shards import _write

from mmsmall.data.elastic import elastic_stream_state
from mmsmall.data.shards import SampleStream


def _entries(tmp_path):
    a = _write(tmp_path / "a", "a", 24, 4)  # 6 shards
    b = _write(tmp_path / "b", "b", 8, 4)  # 2 shards: strided on 3 ranks
    return [{"path": str(a), "rate": 3.0}, {"path": str(b), "rate": 1.0}]


def _key(stream: SampleStream, ref) -> tuple[int, int, int, int]:
    """(entry, epoch, shard index, position): the same sample on any world size."""
    i, epoch, shard_pos, pos = ref
    return i, epoch, stream._epoch_shards(i, epoch)[0][shard_pos], pos


def _run(streams, draws, held, hold_first=False):
    """Each stream draws ``draws[r]`` samples, the last ``held[r]`` (``hold_first``: the first) kept
    back (pending); returns the trained sample keys, the states and the held refs."""
    trained, states, pending = [], [], []
    for stream, n, h in zip(streams, draws, held):
        refs = [s["ref"] for s in itertools.islice(stream, n)]
        kept, held_refs = (refs[h:], refs[:h]) if hold_first else (refs[: n - h], refs[n - h :])
        trained += [_key(stream, r) for r in kept]
        states.append(stream.state_dict())
        pending.append([list(r) for r in held_refs])
    return trained, states, pending


def _resume(entries, world, states, pending):
    streams = [SampleStream(entries, seed=3, rank=r, world_size=world) for r in range(world)]
    for s in streams:
        s.load_state_dict(elastic_stream_state(s, states, pending))
    return streams


def _epoch0(keys):
    return Counter((i, shard, pos) for i, epoch, shard, pos in keys if epoch == 0)


@pytest.mark.parametrize("path", [(1,), (3,), (3, 1), "wrapped"])
def test_every_sample_of_the_epoch_trained_once_across_world_sizes(tmp_path, path):
    entries = _entries(tmp_path)
    first = [SampleStream(entries, seed=3, rank=r, world_size=2) for r in range(2)]
    if path == "wrapped":  # both old ranks are past epoch 0 but still hold examples drawn in it
        trained, states, pending = _run(first, draws=[40, 36], held=[2, 1], hold_first=True)
        assert all(int(s["entries"][0]["epoch"]) >= 1 for s in states)
        path = (1,)
    else:
        trained, states, pending = _run(first, draws=[11, 5], held=[3, 1])
    for k, world in enumerate(path):
        streams = _resume(entries, world, states, pending)
        if k + 1 < len(path):  # a middle run: a few more draws, uneven, some held back again
            more, states, pending = _run(streams, draws=[4, 2, 6][:world], held=[1, 0, 2][:world])
            trained += more
    for s in streams:  # the last run goes on well past the epoch
        trained += [_key(s, x["ref"]) for x in itertools.islice(s, 80)]
    counts = _epoch0(trained)
    every = {(0, shard, pos) for shard in range(6) for pos in range(4)}
    every |= {(1, shard, pos) for shard in range(2) for pos in range(4)}
    assert set(counts) == every  # nothing skipped
    assert max(counts.values()) == 1, [k for k, c in counts.items() if c > 1]  # nothing repeated


def test_same_world_resume_is_unchanged(tmp_path):
    """The elastic marks do not touch a resume on the same world size: the stream continues exactly."""
    entries = _entries(tmp_path)
    s = SampleStream(entries, seed=3, rank=1, world_size=2)
    list(itertools.islice(s, 7))
    state = s.state_dict()
    want = [x["ref"] for x in itertools.islice(s, 20)]
    again = SampleStream(entries, seed=3, rank=1, world_size=2)
    again.load_state_dict(state)
    assert [x["ref"] for x in itertools.islice(again, 20)] == want and state["done"] == {}
