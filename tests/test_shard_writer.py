"""Shard writer: deterministic bytes, manifest integrity, key hygiene."""

import hashlib
import io
import json
import tarfile

import pytest
from PIL import Image

from data_tools.shards import ShardWriter, read_manifest, safe_key


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, "PNG")
    return buf.getvalue()


def _write(out):
    with ShardWriter(out, prefix="t", max_count=2) as w:
        for i in range(5):
            w.write(f"s{i}", _png((i * 40, 0, 0)), "png", {"id": f"s{i}", "task": "caption"})
    return read_manifest(out)


def test_manifest_counts_bytes_and_hashes(tmp_path):
    m = _write(tmp_path)
    assert [s["count"] for s in m["shards"]] == [2, 2, 1] and m["total"] == 5
    for s in m["shards"]:
        data = (tmp_path / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    with tarfile.open(tmp_path / "t-000000.tar") as tar:
        names = tar.getnames()
        assert names == ["s0.png", "s0.json", "s1.png", "s1.json"]
        assert json.loads(tar.extractfile("s1.json").read())["id"] == "s1"
    assert not list(tmp_path.glob("*.tmp"))


def test_same_samples_give_identical_bytes(tmp_path):
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_bad_keys_and_duplicates_are_refused(tmp_path):
    w = ShardWriter(tmp_path)
    with pytest.raises(ValueError, match="no dots"):
        w.write("a.b", _png((0, 0, 0)), "png", {})
    w.write("a", _png((0, 0, 0)), "png", {})
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", _png((0, 0, 0)), "png", {})
    assert safe_key("../x/y.z") == "___x_y_z"
