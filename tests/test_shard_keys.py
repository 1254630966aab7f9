"""One key rule for curation and training: same-named files in different tar folders stay two samples."""

from __future__ import annotations

import io
import json
import tarfile

from data_tools.curate import run_curation
from data_tools.fixtures import encode, natural_image
from mmsmall.data.shards import iter_samples


def _foldered_tar(path):
    """red/0001 and blue/0001 (two samples), and 0002 whose json member appears twice."""
    msgs = [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "A picture of a scene."}]
    members = []
    for n, key in enumerate(("red/0001", "blue/0001", "0002")):
        members += [(f"{key}.jpg", encode(natural_image(n, (64, 64)))),
                    (f"{key}.json", json.dumps({"id": key.replace("/", "_"), "messages": msgs}).encode())]  # fmt: skip
    members.append(("0002.json", json.dumps({"id": "impostor", "messages": msgs}).encode()))
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_member_key_rule():
    from mmsmall.data.keys import member_key

    assert member_key("red/0001.jpg") == ("red/0001", "jpg")
    assert member_key("a/b/0001.seg.PNG") == ("a/b/0001", "seg.png")
    assert member_key("README") is None


def test_training_reader_keeps_folders_apart_and_counts_repeats(tmp_path):
    tar = _foldered_tar(tmp_path / "s-000000.tar")
    counters: dict[str, int] = {}
    ids = sorted(s["json"]["id"] for s in iter_samples([tar], counters=counters))
    assert ids == ["0002", "blue_0001", "red_0001"]  # the first 0002.json wins, the repeat is counted
    assert counters.get("duplicate_member") == 1


def test_curation_agrees_with_the_training_reader(tmp_path):
    (tmp_path / "in").mkdir()
    tar = _foldered_tar(tmp_path / "in" / "s-000000.tar")
    cfg = {"inputs": [{"kind": "webdataset", "path": str(tar), "name": "w"}], "out_dir": str(tmp_path / "out"),
           "report": {"enabled": False}, "dedup": {"near": False}}  # fmt: skip
    summary = run_curation(cfg, workers=1)
    assert summary["n_kept"] == 3 and summary["dropped"] == {"duplicate_member": 1}
    read = sorted(s["json"]["id"] for s in iter_samples(tmp_path / "out"))
    assert read == ["0002", "blue_0001", "red_0001"]
