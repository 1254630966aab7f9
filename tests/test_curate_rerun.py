"""A rerun into the same folder after its inputs change writes what a fresh run writes (issue 23).

Units are keyed by what they read: rows, files and their sizes and mtimes, and the benchmark files
of decontamination. Each case runs once, changes one input, reruns into the same out/work folders,
and compares every shard byte for byte with a fresh run into new folders.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data_tools.curate import run_curation
from data_tools.fixtures import encode, natural_image, write_jsonl
from mmsmall import cli


def _inputs(root: Path) -> dict:
    """A jsonl of six captioned images (two units) and a ChartQA-style benchmark folder."""
    (root / "img").mkdir()
    rows = []
    for i in range(6):
        (root / "img" / f"{i}.jpg").write_bytes(encode(natural_image(40 + i, (96, 80))))
        rows.append({"id": f"r{i}", "image": f"img/{i}.jpg", "caption": f"a photo of scene number {i}"})
    write_jsonl(root / "rows.jsonl", rows)
    test = root / "ChartQA" / "test"
    (test / "png").mkdir(parents=True)
    (test / "png" / "c0.png").write_bytes(encode(natural_image(900, (96, 80)), "PNG"))
    items = [{"imgname": "c0.png", "query": "What is the peak value?", "label": "7"}]
    (test / "test_human.json").write_text(json.dumps(items))
    return {
        "inputs": [{"kind": "jsonl", "path": str(root / "rows.jsonl")}],
        "decontam": {"benchmarks": [{"path": str(root / "ChartQA")}]},
        "unit_size": 3,
        "shard_size": 4,
        "report": {"enabled": False},
    }


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} | {
        "manifest": json.dumps(json.loads((out / "manifest.json").read_text())["shards"]).encode()
    }


def _bump(path: Path) -> None:
    """Move a file's mtime forward a second: an edit made within the same clock tick still shows."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _add_row(root: Path) -> None:
    (root / "img" / "new.jpg").write_bytes(encode(natural_image(77, (96, 80))))
    with open(root / "rows.jsonl", "a") as f:
        f.write(json.dumps({"id": "r_new", "image": "img/new.jpg", "caption": "a brand new scene"}) + "\n")


def _edit_caption(root: Path) -> None:
    p = root / "rows.jsonl"
    p.write_text(p.read_text().replace("scene number 1", "scene number one, edited"))


def _replace_image(root: Path) -> None:
    (root / "img" / "2.jpg").write_bytes(encode(natural_image(555, (96, 80))))
    _bump(root / "img" / "2.jpg")


def _delete_image(root: Path) -> None:  # a takedown request
    (root / "img" / "4.jpg").unlink()


def _plant_in_benchmark(root: Path) -> None:  # the benchmark's image becomes a copy of a training image
    png = root / "ChartQA" / "test" / "png" / "c0.png"
    png.write_bytes((root / "img" / "5.jpg").read_bytes())
    _bump(png)


CHANGES = {
    "row_added": (_add_row, {"n_in": 7}),
    "caption_edited": (_edit_caption, {}),
    "image_replaced": (_replace_image, {}),
    "image_deleted": (_delete_image, {"dropped": {"missing_image": 1}}),
    "benchmark_image_replaced": (_plant_in_benchmark, {"dropped": {"decontam_image": 1}}),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_rerun_after_an_input_change_equals_a_fresh_run(tmp_path, change):
    cfg = _inputs(tmp_path)
    first = run_curation(cfg | {"out_dir": str(tmp_path / "out")}, workers=1)
    assert first["n_in"] == 6 and first["dropped"] == {}
    edit, expect = CHANGES[change]
    edit(tmp_path)
    again = run_curation(cfg | {"out_dir": str(tmp_path / "out")}, workers=1)
    fresh = run_curation(cfg | {"out_dir": str(tmp_path / "fresh")}, workers=1)
    assert _shards(tmp_path / "out") == _shards(tmp_path / "fresh")
    for k in ("n_in", "n_kept", "dropped"):
        assert again[k] == fresh[k]
    for k, v in expect.items():
        assert again[k] == v, (k, again[k])
    assert again["units_resumed"] < again["units"]  # some unit was read again ...
    redone = {"row_added": 0, "benchmark_image_replaced": again["units"]}.get(change, 1)
    assert again["units_redone"] == redone  # ... the changed ones (a new unit is not "redone")
    if change == "image_deleted":  # a takedown: the deleted image is in no shard
        assert b'"id": "r4"' not in b"".join(_shards(tmp_path / "out").values())
    untouched = run_curation(cfg | {"out_dir": str(tmp_path / "out")}, workers=1)
    assert untouched["units_resumed"] == untouched["units"] and untouched["units_redone"] == 0


def test_cli_rerun_reports_the_redone_units(tmp_path, monkeypatch, capsys):
    cfg = _inputs(tmp_path) | {"out_dir": str(tmp_path / "out")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))

    def curate() -> dict:
        monkeypatch.setattr(sys, "argv", ["mmsmall", "curate", str(tmp_path / "c.yaml"), "--workers", "1"])
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code in (0, None)
        return json.loads(capsys.readouterr().out)

    assert curate()["units_redone"] == 0
    _edit_caption(tmp_path)
    summary = curate()
    assert (summary["units"], summary["units_resumed"], summary["units_redone"]) == (2, 1, 1)


def test_parquet_input_change_is_seen(tmp_path):
    """A parquet unit is a row range of a file: rewriting the file redoes it."""
    imgs = [encode(natural_image(60 + i, (96, 80))) for i in range(3)]

    def write(captions: list[str]) -> None:
        table = {"image": [{"bytes": b, "path": None} for b in imgs], "caption": captions}
        pq.write_table(pa.table(table), tmp_path / "in.parquet")
        _bump(tmp_path / "in.parquet")

    write(["one", "two", "three"])
    cfg = {
        "inputs": [{"kind": "parquet", "path": str(tmp_path / "in.parquet")}],
        "report": {"enabled": False},
    }
    run_curation(cfg | {"out_dir": str(tmp_path / "out")}, workers=1)
    write(["one", "two", "three, rewritten"])
    again = run_curation(cfg | {"out_dir": str(tmp_path / "out")}, workers=1)
    run_curation(cfg | {"out_dir": str(tmp_path / "fresh")}, workers=1)
    assert again["units_redone"] == 1
    assert _shards(tmp_path / "out") == _shards(tmp_path / "fresh")
    assert b"three, rewritten" in b"".join(_shards(tmp_path / "out").values())
