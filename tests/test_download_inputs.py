"""Curation inputs from the image-URL world: LAION/DataComp metadata parquet (fetched first, with the
command the error gives) and img2dataset's own output shards (failures included)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from data_tools.curate import run_curation
from data_tools.fixtures import encode, natural_image
from data_tools.httpfixture import LocalServer, Route
from mmsmall.cli import app
from mmsmall.config import ConfigError


def _jpg(seed: int) -> bytes:
    return encode(natural_image(seed, (96, 72)), "JPEG")


def _curate(path: Path, out: Path, **inp) -> dict:
    return run_curation(
        {"inputs": [{"kind": "webdataset", "path": str(path), **inp}], "out_dir": str(out),
         "report": {"enabled": False}, "dedup": {"near": False}},
        workers=1,
    )  # fmt: skip


def _captions(out: Path) -> list[str]:
    import tarfile

    caps = []
    for t in sorted(out.glob("*.tar")):
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    caps.append(json.loads(tar.extractfile(m).read())["messages"][-1]["content"])
    return sorted(caps)


def _img2dataset_shard(folder: Path, shard_id: int, rows: list[dict]) -> None:
    """One shard as img2dataset 1.47 writes it with ``--output_format webdataset --caption_col TEXT
    --save_additional_columns '["NSFW","similarity","LICENSE"]'`` (rom1504/img2dataset):
    ``img2dataset/writer.py`` WebDatasetSampleWriter: ``{shard:05d}.tar`` through webdataset's TarWriter,
    per success ``{"__key__": key, "jpg": bytes, "txt": caption, "json": json.dumps(meta, indent=4)}``;
    every row (failures too, which get no sample) into ``{shard:05d}.parquet``;
    ``img2dataset/downloader.py``: ``key`` is ``compute_key`` (10**oom_sample_per_shard * shard + row,
    zero-padded to 5 + 4 digits at 10,000 samples per shard); meta = the additional columns, then
    ``caption`` and ``url`` (reader.py's column_list), then ``key, status, error_message, width, height,
    original_width, original_height, exif, sha256``; status ``success`` / ``failed_to_download`` /
    ``failed_to_resize`` with urllib's ``str(err)`` as ``error_message``;
    ``img2dataset/logger.py`` write_stats: ``{shard:05d}_stats.json``. The error messages are the ones a
    real img2dataset 1.47.0 run wrote for a 404, a stalled host and an HTML page (see the test below
    that runs it when installed)."""
    import hashlib

    import webdataset as wds

    metas = []
    with open(folder / f"{shard_id:05d}.tar", "wb") as fd:
        writer = wds.TarWriter(fd)
        for n, r in enumerate(rows):
            ok = r.get("image") is not None
            meta = {"NSFW": "UNLIKELY", "similarity": r["similarity"], "LICENSE": "?", "caption": r["TEXT"],
                    "url": r["URL"], "key": f"{10**4 * shard_id + n:09d}",
                    "status": "success" if ok else r["status"], "error_message": None if ok else r["error"],
                    "width": 96 if ok else None, "height": 72 if ok else None,
                    "original_width": 96 if ok else None, "original_height": 72 if ok else None,
                    "exif": "{}" if ok else None,
                    "sha256": hashlib.sha256(r["image"]).hexdigest() if ok else None}  # fmt: skip
            metas.append(meta)
            if ok:
                writer.write({"__key__": meta["key"], "jpg": r["image"], "txt": r["TEXT"],
                              "json": json.dumps(meta, indent=4)})  # fmt: skip
        writer.close()
    pq.write_table(pa.Table.from_pylist(metas), folder / f"{shard_id:05d}.parquet")
    ok = sum(m["status"] == "success" for m in metas)
    (folder / f"{shard_id:05d}_stats.json").write_text(json.dumps({
        "count": len(rows), "successes": ok, "failed_to_download": sum(m["status"] == "failed_to_download" for m in metas),
        "failed_to_resize": sum(m["status"] == "failed_to_resize" for m in metas), "duration": 1.0,
        "start_time": 0.0, "end_time": 1.0, "status_dict": {"success": ok}}, indent=4))  # fmt: skip


def test_img2dataset_output_shards_curate_with_their_captions_and_failures(tmp_path):
    """`{kind: webdataset, path: <img2dataset output folder>}`: each sample's .txt is its caption, the
    parquet and stats files beside the tars are not shards, and the rows img2dataset failed on (in
    the parquet only) reach the funnel under reason codes."""
    folder = tmp_path / "i2d"
    folder.mkdir()
    good = dict(status="success", similarity=0.33)
    _img2dataset_shard(folder, 0, [
        {**good, "URL": "http://h/a.jpg", "TEXT": "a red barn in a field", "image": _jpg(1)},
        {"URL": "http://h/b.jpg", "TEXT": "gone", "similarity": 0.3, "status": "failed_to_download",
         "error": "HTTP Error 404: Not Found"},
        {**good, "URL": "http://h/c.jpg", "TEXT": "two dogs on a beach at sunset", "image": _jpg(2)},
    ])  # fmt: skip
    _img2dataset_shard(folder, 1, [
        {"URL": "http://h/d.jpg", "TEXT": "x", "similarity": 0.3, "status": "failed_to_download",
         "error": "timed out"},
        {"URL": "http://h/e.jpg", "TEXT": "y", "similarity": 0.3, "status": "failed_to_download",
         "error": "hash mismatch"},
        {"URL": "http://h/f.jpg", "TEXT": "z", "similarity": 0.3, "status": "failed_to_resize",
         "error": "Image decoding error"},
        {**good, "URL": "http://h/g.jpg", "TEXT": "a bowl of ramen with egg", "image": _jpg(3)},
    ])  # fmt: skip
    summary = _curate(folder, tmp_path / "cur")
    assert summary["n_in"] == 7 and summary["n_kept"] == 3, summary["dropped"]
    assert dict(summary["dropped"]) == {"fetch_http_404": 1, "fetch_timeout": 1, "fetch_sha256_mismatch": 1,
                                        "fetch_failed_to_resize": 1}  # fmt: skip
    assert _captions(tmp_path / "cur") == [
        "a bowl of ramen with egg", "a red barn in a field", "two dogs on a beach at sunset"]  # fmt: skip


def test_laion_metadata_parquet_is_fetched_first_then_curated(tmp_path):
    """LAION-400M's metadata columns as img2dataset's example reads them (dataset_examples/laion400m.md:
    ``--url_col "URL" --caption_col "TEXT"``, additional columns NSFW, similarity, LICENSE). Curating the
    parquet itself stops with the download command; a download without ``--url-field URL`` names the
    column; the command as given, then curating its shards, keeps TEXT as the caption."""
    routes = {"/a.jpg": Route(_jpg(11), "binary/octet-stream"), "/b.jpg": Route(_jpg(12))}
    with LocalServer(routes) as srv:
        urls = [srv.url("/a.jpg"), srv.url("/missing.jpg"), srv.url("/b.jpg")]
        pq.write_table(pa.table({"SAMPLE_ID": [11, 12, 13], "URL": urls,
                                 "TEXT": ["a lighthouse on a cliff", "lost", "a cat asleep on a keyboard"],
                                 "HEIGHT": [72] * 3, "WIDTH": [96] * 3, "LICENSE": ["?"] * 3,
                                 "NSFW": ["UNLIKELY"] * 3, "similarity": [0.31, 0.30, 0.35]}),
                       tmp_path / "part-00000.parquet")  # fmt: skip
        with pytest.raises(
            ConfigError, match="mmsmall download .* --url-field URL --caption-field TEXT"
        ) as e:
            run_curation({"inputs": [{"kind": "parquet", "path": str(tmp_path / "part-00000.parquet")}],
                          "out_dir": str(tmp_path / "cur0")}, workers=1)  # fmt: skip
        command = str(e.value).split("`")[1].replace("DIR", str(tmp_path / "dl")).split()
        assert command[:2] == ["mmsmall", "download"]
        res = CliRunner().invoke(app, [*command[1:3], "--out", str(tmp_path / "dl0")])
        assert (
            res.exit_code == 2 and "no URL column 'url'" in res.output and "LAION-400M/5B: URL" in res.output
        )
        res = CliRunner().invoke(app, [*command[1:], "--retries", "0"])
        assert res.exit_code == 0, res.output
    summary = _curate(tmp_path / "dl" / "shards", tmp_path / "cur")
    assert summary["n_in"] == 3 and dict(summary["dropped"]) == {"fetch_http_404": 1}
    assert _captions(tmp_path / "cur") == ["a cat asleep on a keyboard", "a lighthouse on a cliff"]


I2D = Path(os.environ.get("IMG2DATASET", "/tmp/i2d/bin/img2dataset"))  # bench/download.py installs it there


@pytest.mark.slow
@pytest.mark.skipif(
    not I2D.exists(), reason="img2dataset 1.47 not installed: run bench/download.py or set IMG2DATASET"
)
def test_real_img2dataset_output_curates_with_its_failures(tmp_path):
    """Side by side with the peer itself when it is installed (its own venv, not a dependency):
    img2dataset 1.47 fetches LAION-style rows from a 127.0.0.1 server, and curation reads its output
    folder: the good image kept with its TEXT caption, the 404, the timeout and the HTML page dropped
    under their reason codes."""
    import subprocess

    routes = {"/a.jpg": Route(_jpg(21)), "/p.html": Route(b"<html>x</html>", "text/html"),
              "/slow.jpg": Route(_jpg(22), stall_s=4.0)}  # fmt: skip
    with LocalServer(routes) as srv:
        pq.write_table(pa.table({"URL": [srv.url(p) for p in ("/a.jpg", "/missing.jpg", "/p.html", "/slow.jpg")],
                                 "TEXT": ["a red barn at dusk", "gone", "page", "slow"], "similarity": [0.3] * 4}),
                       tmp_path / "laion.parquet")  # fmt: skip
        cmd = [str(I2D), "--url_list", str(tmp_path / "laion.parquet"), "--input_format", "parquet", "--url_col",
               "URL", "--caption_col", "TEXT", "--output_format", "webdataset", "--output_folder",
               str(tmp_path / "i2d"), "--processes_count", "1", "--thread_count", "4", "--resize_mode", "no",
               "--skip_reencode", "True", "--save_additional_columns", '["similarity"]', "--timeout", "1"]  # fmt: skip
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
        subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=env)
    assert sorted(p.name for p in (tmp_path / "i2d").iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]
    summary = _curate(tmp_path / "i2d", tmp_path / "cur")
    assert summary["n_in"] == 4 and summary["n_kept"] == 1
    assert dict(summary["dropped"]) == {"fetch_http_404": 1, "fetch_timeout": 1, "fetch_failed_to_resize": 1}
    assert _captions(tmp_path / "cur") == ["a red barn at dusk"]
