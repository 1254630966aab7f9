"""Curation keeps its promises on hostile records: no record stops a run, a run deletes only its own files."""

from __future__ import annotations

import io
import json
import math
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_tools.curate import run_curation
from data_tools.fixtures import encode, natural_image, write_jsonl

GOOD = "A small red ball rests on a wooden table."
_JPEGS = [encode(natural_image(seed, (64, 64)), quality=90) for seed in range(8)]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.just("long id " * 40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
ROW_FIELDS = ("id", "image", "caption", "text", "messages", "question", "answer")
POINT_FIELDS = ("id", "image", "label", "points", "width", "height")
SHARD_FIELDS = ("id", "source", "task", "messages", "points", "meta")


def _tar(path: Path, samples: dict[str, dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for n, (key, meta) in enumerate(samples.items()):
            for name, data in ((f"{key}.jpg", _JPEGS[4 + n]), (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _hostile_inputs(root: Path, rows: dict, points: dict, shard: dict) -> dict:
    """Four inputs (jsonl, points, webdataset, parquet), each one good record and one hostile one.

    Parquet (like csv and hf datasets) holds text columns: the hostile values go in JSON-encoded.
    """
    for i in range(4):
        (root / f"im{i}.jpg").write_bytes(_JPEGS[i])
    good_row = {"id": "good_row", "image": "im0.jpg", "caption": GOOD}
    write_jsonl(
        root / "rows.jsonl", [good_row, {"id": "bad_row", "image": "im1.jpg", "caption": GOOD} | rows]
    )
    good_pt = {"id": "good_pt", "image": "im2.jpg", "label": "ball", "points": [{"x": 10, "y": 20}]}
    bad_pt = {"id": "bad_pt", "image": "im3.jpg", "label": "cup", "points": [{"x": 5, "y": 5}]}
    bad_pt |= {"width": 64, "height": 64} | points
    write_jsonl(root / "points.jsonl", [good_pt | {"width": 64, "height": 64}, bad_pt])
    (root / "wds").mkdir(exist_ok=True)
    msgs = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": GOOD}]
    _tar(root / "wds" / "s-000000.tar", {"good": {"id": "good_wds", "messages": msgs},
                                         "bad": {"id": "bad_wds", "messages": msgs} | shard})  # fmt: skip
    for i in (4, 5):
        (root / f"im{i}.jpg").write_bytes(_JPEGS[2 + i])
    table = [{"id": "good_pq", "image": "im4.jpg", "caption": GOOD},
             {"id": "bad_pq", "image": "im5.jpg", "caption": GOOD} | {k: json.dumps(v) for k, v in rows.items()}]  # fmt: skip
    keys = sorted({k for row in table for k in row})  # every column in every row (None where unset)
    table = [{k: row.get(k) for k in keys} for row in table]
    pq.write_table(pa.Table.from_pylist(table), root / "rows.parquet")
    return {
        "inputs": [
            {"kind": "parquet", "path": str(root / "rows.parquet"), "name": "pq"},
            {"kind": "jsonl", "path": str(root / "rows.jsonl"), "name": "rows"},
            {"kind": "points", "path": str(root / "points.jsonl"), "coords": "pixels", "name": "pts"},
            {"kind": "webdataset", "path": str(root / "wds"), "name": "wds"},
        ],
        "out_dir": str(root / "out"),
        "report": {"enabled": False},
        "dedup": {"near": False},
    }


def _kept(out: Path) -> list[dict]:
    found = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]
    return found


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    rows=st.dictionaries(st.sampled_from(ROW_FIELDS), json_values, min_size=1),
    points=st.dictionaries(st.sampled_from(POINT_FIELDS), json_values, min_size=1),
    shard=st.dictionaries(st.sampled_from(SHARD_FIELDS), json_values, min_size=1),
)
def test_any_json_in_any_field_is_a_reason_coded_drop_or_a_clean_sample(rows, points, shard):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        summary = run_curation(_hostile_inputs(root, rows, points, shard), workers=1)
        assert summary["n_in"] == 8
        assert summary["n_in"] == summary["n_kept"] + sum(summary["dropped"].values())
        assert "record_error" not in summary["dropped"], summary["dropped"]  # every drop has a real reason
        kept = _kept(root / "out")
        ids = {s["id"] for s in kept}
        assert {"good_row", "good_pt", "good_wds", "good_pq"} <= ids  # a hostile neighbour loses nothing good
        for s in kept:  # what is kept has the schema's shapes, whatever came in
            assert all(isinstance(s[k], str) for k in ("id", "source", "task"))
            assert s["messages"] and all(
                isinstance(m, dict) and isinstance(m["role"], str) and isinstance(m["content"], str)
                for m in s["messages"]
            )
            assert isinstance(s["meta"], dict) and isinstance(s["points"], list)
            for p in s["points"]:
                assert isinstance(p["label"], str)
                assert all(math.isfinite(v) and 0 <= v <= 1 for xy in p["xy"] for v in xy)


def test_issue_examples_are_dropped_as_bad_annotation(tmp_path):
    cfg = _hostile_inputs(tmp_path, {"messages": [7]}, {"width": "wide"}, {"points": 5})
    summary = run_curation(cfg, workers=1)
    assert summary["n_kept"] == 4
    assert summary["dropped"] == {"bad_annotation": 3, "point_malformed": 1}


def test_keep_work_false_deletes_only_the_runs_files(tmp_path):
    work = tmp_path / "mine"
    (work / "units").mkdir(parents=True)
    (work / "notes.txt").write_text("my notes")
    (work / "units" / "todo.md").write_text("mine too")
    cfg = _hostile_inputs(tmp_path, {}, {}, {}) | {"work_dir": str(work), "keep_work": False}
    assert run_curation(cfg, workers=1)["n_kept"] == 8
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == [
        "notes.txt", "units", "units/todo.md"
    ]  # fmt: skip
    fresh = tmp_path / "fresh_work"
    run_curation(cfg | {"work_dir": str(fresh), "out_dir": str(tmp_path / "out2")}, workers=1)
    assert not fresh.exists()  # a work folder the run made and emptied goes too


def test_clip_config_registration_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile as tf

    import open_clip  # imported first: its own imports make temporary folders of their own

    from data_tools.clipscore import TINY_CLIP, _register

    monkeypatch.setattr(tf, "tempdir", str(tmp_path))
    _register("mmsmall-test-clip", TINY_CLIP)
    assert "mmsmall-test-clip" in open_clip.list_models()
    assert list(tmp_path.iterdir()) == []


def test_failed_start_leaves_no_empty_output_folder(tmp_path):
    from mmsmall.config import ConfigError

    cfg = {
        "inputs": [{"kind": "jsonl", "path": str(tmp_path / "missing.jsonl")}],
        "out_dir": str(tmp_path / "out"),
    }
    with pytest.raises(ConfigError, match="input file not found"):
        run_curation(cfg, workers=1)
    assert not (tmp_path / "out").exists()


def test_keep_work_false_spares_files_named_like_work_files(tmp_path):
    """The cleanup deletes what the run's own plan names, not whatever matches a work-file pattern."""
    work = tmp_path / "work"
    theirs = ["units/u000099.tar", "units/u000099.done.json", "shards/000050.json", "decontam.json",
              "reduce/cols/u000042.npz", "reduce/keys/g7.npy"]  # fmt: skip
    for name in theirs:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("not the run's")
    cfg = _hostile_inputs(tmp_path, {}, {}, {}) | {"work_dir": str(work), "keep_work": False}
    assert run_curation(cfg, workers=1)["n_kept"] == 8
    left = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    assert left == sorted(theirs)


def test_parquet_folder_resolves_relative_image_paths_beside_each_file(tmp_path):
    folder = tmp_path / "pq"
    (folder / "imgs").mkdir(parents=True)
    for i in range(3):
        (folder / "imgs" / f"{i}.jpg").write_bytes(_JPEGS[i])
    table = pa.table({"id": [f"p{i}" for i in range(3)], "image": [f"imgs/{i}.jpg" for i in range(3)],
                      "caption": [GOOD] * 3})  # fmt: skip
    pq.write_table(table, folder / "part-0.parquet")
    runs = {}
    for name, path in (("folder", folder), ("file", folder / "part-0.parquet")):
        cfg = {"inputs": [{"kind": "parquet", "path": str(path)}], "out_dir": str(tmp_path / name),
               "report": {"enabled": False}}  # fmt: skip
        runs[name] = run_curation(cfg, workers=1)
    assert runs["folder"]["n_kept"] == runs["file"]["n_kept"] == 3 and runs["folder"]["dropped"] == {}


def test_folder_input_with_a_bad_caption_file_and_broken_links(tmp_path):
    """A caption that is not UTF-8, a dangling symlink and a symlink loop: each one sample dropped
    and counted in n_in, the rest of the folder curated."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(_JPEGS[i])
        (folder / f"{i}.txt").write_text(f"{GOOD} Number {i}.")
    (folder / "1.txt").write_bytes("Une balle rouge sur la table, d\xe9j\xe0 vue.".encode("latin-1"))
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    cfg = {"inputs": [{"kind": "folder", "path": str(folder)}], "out_dir": str(tmp_path / "out"),
           "report": {"enabled": False}}  # fmt: skip
    summary = run_curation(cfg, workers=1)
    assert summary["n_in"] == 5 and summary["n_kept"] == 2
    assert summary["dropped"] == {"bad_annotation": 1, "missing_image": 1, "unreadable": 1}


@pytest.mark.slow
def test_sigterm_to_the_driver_leaves_no_pool_workers(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    (tmp_path / "wds").mkdir()
    for t in range(4):
        _tar(tmp_path / "wds" / f"s-{t:06d}.tar", {f"k{t}": {"id": f"k{t}"}})
    cfg = {"inputs": [{"kind": "webdataset", "path": str(tmp_path / "wds")}], "out_dir": str(tmp_path / "out"),
           "report": {"enabled": False}}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "data_tools", "curate", str(tmp_path / "c.json"), "--workers", "2"]
    env = {**os.environ, "DATA_TOOLS_UNIT_DELAY_S": "5"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list = []
    try:
        marker = tmp_path / "out" / "_work" / "units" / "u000000.done.json"
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers and marker.exists(), "the signal must land while units run"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert alive == [], f"pool workers still running after the driver's SIGTERM: {alive}"
    finally:  # whatever the outcome, nothing this test started keeps running
        for p in workers:
            if p.is_running():
                p.kill()
        if proc.poll() is None:
            proc.kill()


def test_out_dir_inside_the_input_folder_is_not_read_back(tmp_path):
    """The report's PNGs and the shards of a run whose out_dir sits in its input folder are not
    inputs of the next run."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(_JPEGS[i])
        (folder / f"{i}.txt").write_text(f"{GOOD} Number {i}.")
    cfg = {"inputs": [{"kind": "folder", "path": str(folder)}], "out_dir": str(folder / "curated")}
    first = run_curation(cfg, workers=1)
    assert list((folder / "curated" / "report").glob("*.png"))  # the report wrote images there
    again = run_curation(cfg | {"work_dir": str(tmp_path / "work2")}, workers=1)  # nothing resumed
    assert first["n_in"] == again["n_in"] == 3 and again["n_kept"] == 3


def test_a_changed_prefix_replaces_the_old_shards(tmp_path):
    cfg = _hostile_inputs(tmp_path, {}, {}, {}) | {"report": {"enabled": False}}
    run_curation(cfg | {"prefix": "old"}, workers=1)
    summary = run_curation(cfg | {"prefix": "new"}, workers=1)
    out = Path(summary["out_dir"])
    listed = sorted(s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"])
    assert sorted(p.name for p in out.glob("*.tar")) == listed and all(n.startswith("new-") for n in listed)


def test_an_input_that_gives_no_samples_is_named_in_a_warning(tmp_path, caplog):
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "image": "a.jpg", "caption": GOOD}])
    (tmp_path / "a.jpg").write_bytes(_JPEGS[0])
    cfg = {"inputs": [{"kind": "jsonl", "path": str(tmp_path / p)} for p in ("rows.jsonl", "empty.jsonl")],
           "out_dir": str(tmp_path / "out"), "report": {"enabled": False}}  # fmt: skip
    summary = run_curation(cfg, workers=1)
    assert summary["n_kept"] == 1 and len(summary["warnings"]) == 1
    assert "inputs[1]" in summary["warnings"][0] and "empty.jsonl" in summary["warnings"][0]
    assert "gave no samples" in caplog.text
