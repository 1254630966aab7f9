"""A shard cut short is never read as a shorter whole one (issue 23, items 5 and 6).

``tarfile`` stops without a word at a header cut short or at a file that ends on a block boundary.
Every reader (curation, training and eval's ``iter_samples``, remote fetches without a
Content-Length) now counts such a shard as unreadable and keeps only the samples before the one the
cut may have taken members from. Folder scans take ``.tar.gz`` / ``.tgz`` shards too.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import pytest

from data_tools.curate import run_curation
from data_tools.fixtures import encode, natural_image
from data_tools.httpfixture import LocalServer, Route
from data_tools.shards import ShardWriter
from eval.tasks.loaders import read_shard_records
from mmsmall.data.shards import iter_samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two 4-sample shards; ``cut`` holds toy-000001.tar cut at the header of its third sample."""
    root = tmp_path_factory.mktemp("trunc")
    with ShardWriter(root / "whole", prefix="toy", max_count=4) as w:
        for i in range(8):
            msgs = [{"role": "user", "content": "Describe this image."},
                    {"role": "assistant", "content": f"picture number {i} of a quiet street"}]  # fmt: skip
            w.write(f"toy_{i:03d}", encode(natural_image(80 + i, (64, 48)), "JPEG"), "jpg",
                    {"id": f"toy{i:03d}", "task": "caption", "messages": msgs})  # fmt: skip
    data = (root / "whole" / "toy-000001.tar").read_bytes()
    with tarfile.open(root / "whole" / "toy-000001.tar") as tar:
        third = [m for m in tar if m.name.startswith("toy_006")][0].offset  # a header boundary
    (root / "cut").mkdir()
    (root / "cut" / "toy-000000.tar").write_bytes((root / "whole" / "toy-000000.tar").read_bytes())
    (root / "cut" / "toy-000001.tar").write_bytes(data[:third])
    return root


# samples 0-3 whole; of the cut shard, toy004 is whole and toy005 (the last before the cut) is dropped
KEPT = [f"toy{i:03d}" for i in range(5)]


def test_training_and_eval_readers_count_a_cut_shard(shards):
    counters: dict[str, int] = {}
    assert [s["json"]["id"] for s in iter_samples(shards / "cut", counters=counters)] == KEPT
    assert counters == {"unreadable_tar": 1}
    recs = read_shard_records(str(shards / "cut"), ("caption",), "toy")
    assert [r.id for r in recs] == KEPT and recs[0].meta["skipped"] == {"unreadable_tar": 1}


def test_curation_counts_a_cut_shard(shards, tmp_path):
    summary = run_curation(
        {"inputs": [{"kind": "webdataset", "path": str(shards / "cut"), "name": "toy"}],
         "out_dir": str(tmp_path / "out"), "report": {"enabled": False}}, workers=1,
    )  # fmt: skip
    assert summary["dropped"] == {"unreadable_shard": 1} and summary["n_kept"] == len(KEPT)


def test_a_remote_shard_without_content_length_cut_mid_transfer_is_counted(shards, tmp_path):
    whole = shards / "whole"
    cut_at = len((shards / "cut" / "toy-000001.tar").read_bytes())
    routes = {
        "/s/toy-000000.tar": Route((whole / "toy-000000.tar").read_bytes(), "application/x-tar"),
        "/s/toy-000001.tar": Route((whole / "toy-000001.tar").read_bytes(), "application/x-tar",
                                   send_length=False, fail_first=99, cut_after=cut_at),
    }  # fmt: skip
    with LocalServer(routes) as srv:
        url = srv.url("/s/toy-{000000..000001}.tar")
        counters: dict[str, int] = {}
        assert [s["json"]["id"] for s in iter_samples(url, counters=counters)] == KEPT
        assert counters == {"unreadable_tar": 1}
        summary = run_curation(
            {"inputs": [{"kind": "webdataset", "path": url, "name": "toy"}],
             "out_dir": str(tmp_path / "out"), "report": {"enabled": False}}, workers=1,
        )  # fmt: skip
    assert summary["dropped"] == {"unreadable_shard": 1} and summary["n_kept"] == len(KEPT)


def test_gzipped_shards_in_a_folder_are_read(shards, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "toy-000000.tar").write_bytes((shards / "whole" / "toy-000000.tar").read_bytes())
    (folder / "toy-000001.tar.gz").write_bytes(
        gzip.compress((shards / "whole" / "toy-000001.tar").read_bytes())
    )
    ids = [f"toy{i:03d}" for i in range(8)]
    assert [s["json"]["id"] for s in iter_samples(folder)] == ids
    summary = run_curation(
        {"inputs": [{"kind": "webdataset", "path": str(folder), "name": "toy"}],
         "out_dir": str(tmp_path / "out"), "report": {"enabled": False}}, workers=1,
    )  # fmt: skip
    assert summary["n_in"] == summary["n_kept"] == 8
