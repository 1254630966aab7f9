"""Shard reading: corrupt members skipped and counted; the mixture stream is seeded, partitioned, resumable."""

import io
import itertools
from collections import Counter

import pytest
from PIL import Image

from data_tools.shards import ShardWriter
from mmsmall.data.shards import SampleStream, iter_samples, resolve_shards, sample_id


def _png(seed: int) -> bytes:
    im = Image.new("RGB", (20, 16), (seed * 37 % 256, seed * 91 % 256, 120))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _write(out, prefix: str, n: int, per_shard: int, corrupt: dict[int, str] | None = None):
    corrupt = corrupt or {}
    with ShardWriter(out, prefix=prefix, max_count=per_shard) as w:
        for i in range(n):
            img = _png(i)
            if corrupt.get(i) == "image":
                img = img[:40]  # truncated PNG
            meta = {"id": f"{prefix}{i}", "task": "caption", "messages": []}
            w.write(f"{prefix}_{i:04d}", img, "png", meta)
    if "json" in corrupt.values():  # rewrite one json member as garbage
        import tarfile

        idx = next(i for i, r in corrupt.items() if r == "json")
        shard = sorted(out.glob("*.tar"))[idx // per_shard]
        members = []
        with tarfile.open(shard) as t:
            for m in t:
                members.append((m, t.extractfile(m).read()))
        with tarfile.open(shard, "w") as t:
            for m, data in members:
                if m.name == f"{prefix}_{idx:04d}.json":
                    data = b"{not json"
                    m.size = len(data)
                t.addfile(m, io.BytesIO(data))
    return out


def test_iter_samples_skips_and_counts_corrupt(tmp_path):
    d = _write(tmp_path / "a", "a", 10, 4, corrupt={3: "image", 6: "json"})
    counters: dict[str, int] = {}
    samples = list(iter_samples(d, counters=counters))
    ids = [sample_id(s) for s in samples]
    assert ids == [f"a{i}" for i in range(10) if i not in (3, 6)]
    assert counters == {"bad_image": 1, "bad_json": 1}
    assert samples[0]["image"].size == (20, 16) and samples[0]["image"].mode == "RGB"
    # the same set through a brace pattern and a list of tars
    tars = resolve_shards(d)
    pattern = str(d / "a-{000000..000002}.tar")
    assert [sample_id(s) for s in iter_samples(pattern)] == ids
    assert [sample_id(s) for s in iter_samples([str(t) for t in tars])] == ids


def test_missing_shard_error_is_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_shards(str(tmp_path / "x-{000000..000001}.tar"))


def test_stream_mixture_partition_and_resume(tmp_path):
    a = _write(tmp_path / "a", "a", 24, 4)
    b = _write(tmp_path / "b", "b", 12, 3)
    entries = [{"path": str(a), "rate": 3.0}, {"path": str(b), "rate": 1.0}]

    def take(stream, n):
        return [sample_id(s) for s in itertools.islice(stream, n)]

    # deterministic for a seed, different for another
    assert take(SampleStream(entries, seed=1), 30) == take(SampleStream(entries, seed=1), 30)
    assert take(SampleStream(entries, seed=1), 30) != take(SampleStream(entries, seed=2), 30)

    # rates: about 3:1 over a long run (several epochs of b)
    drawn = Counter(x[0] for x in take(SampleStream(entries, seed=0), 400))
    assert 2.2 < drawn["a"] / drawn["b"] < 4.0

    # one epoch of a, split over 2 ranks: disjoint, together everything
    r0 = take(SampleStream([entries[0]], seed=5, rank=0, world_size=2), 12)
    r1 = take(SampleStream([entries[0]], seed=5, rank=1, world_size=2), 12)
    assert not set(r0) & set(r1) and set(r0) | set(r1) == {f"a{i}" for i in range(24)}

    # exact resume mid-shard: position survives a fresh object
    s = SampleStream(entries, seed=3)
    head = take(s, 17)
    state = s.state_dict()
    tail = take(s, 20)
    s2 = SampleStream(entries, seed=3)
    s2.load_state_dict(state)
    assert take(s2, 20) == tail
    # a sample's ref re-reads the same sample
    s3 = SampleStream(entries, seed=3)
    first = next(s3)
    assert sample_id(s3.sample_at(first["ref"])) == sample_id(first) == head[0]


def test_mixture_reads_each_shard_once_while_switching_entries(tmp_path, monkeypatch):
    """A mixture draws its entry per sample; each entry keeps its current shard open, so switching
    entries does not re-read a tar (it did: one tar read per switch, the demo's slowest part)."""
    import mmsmall.data.shards as shards

    a = _write(tmp_path / "a", "a", 8, 8)
    b = _write(tmp_path / "b", "b", 8, 8)
    reads = []
    real = shards.read_shard_members
    monkeypatch.setattr(shards, "read_shard_members", lambda p, c=None: reads.append(p.name) or real(p, c))
    stream = SampleStream([{"path": str(a)}, {"path": str(b)}], seed=0)
    ids = [sample_id(s) for s in itertools.islice(stream, 8)]
    assert {i[0] for i in ids} == {"a", "b"} and sorted(reads) == ["a-000000.tar", "b-000000.tar"]
