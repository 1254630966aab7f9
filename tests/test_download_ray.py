"""`mmsmall download --executor ray` on a real Ray head (127.0.0.1) writes the same shards as the
local run, against a 127.0.0.1 HTTP server this test starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ray_head import ray_head, run_driver
from test_download import shard_contents

from data_tools.download import DownloadConfig, download
from data_tools.fixtures import encode, natural_image, write_jsonl
from data_tools.httpfixture import LocalServer, Route

ray = pytest.importorskip("ray", reason="Ray is the `distributed` extra: pip install 'mmsmall[distributed]'")


@pytest.mark.slow
def test_ray_download_on_a_local_head_writes_the_local_runs_shards(tmp_path):
    root = Path(__file__).resolve().parent.parent
    routes = {f"/i{i}.jpg": Route(encode(natural_image(300 + i, (64, 48)), "JPEG"), "binary/octet-stream")
              for i in range(8)}  # fmt: skip
    routes["/p.png"] = Route(encode(natural_image(399, (64, 48)), "PNG"), "image/png")
    routes["/page.html"] = Route(b"<html>moved</html>", "text/html")
    paths = [f"/i{i}.jpg" for i in range(8)] + [
        "/p.png",
        "/page.html",
        "/missing.jpg",
        "/i0.jpg",
        "/i3.jpg",
        None,
    ]
    with LocalServer(routes) as srv:
        rows = [{"url": srv.url(p) if p else None, "TEXT": f"caption {n}", "key": f"{n:09d}", "similarity": 0.31}
                for n, p in enumerate(paths)]  # fmt: skip
        write_jsonl(tmp_path / "rows.jsonl", rows)
        cfg = DownloadConfig(shard_rows=4, caption_field="TEXT", retries=0, read_timeout_s=10)
        local = download(tmp_path / "rows.jsonl", tmp_path / "local", cfg)
        with ray_head(root) as env:
            cmd = [sys.executable, "-m", "mmsmall.cli", "download", str(tmp_path / "rows.jsonl"), "--out",
                   str(tmp_path / "ray"), "--shard-rows", "4", "--caption-field", "TEXT", "--retries", "0",
                   "--timeout", "10", "--executor", "ray", "--workers", "2"]  # fmt: skip
            out = run_driver(cmd, env, root)
    report = json.loads(out.stdout)
    assert "download shards (ray)" in out.stderr  # the shards ran as Ray tasks
    assert local["n_ok"] == 11 and local["failed"] == {
        "fetch_http_404": 1,
        "fetch_no_url": 1,
        "fetch_not_image": 1,
    }
    assert {k: v for k, v in report.items() if k != "shards"} == {
        k: v for k, v in local.items() if k != "shards"
    }
    want = shard_contents(tmp_path / "local" / "shards")
    assert len([k for k in want if k.endswith(".tar")]) == 4
    assert shard_contents(tmp_path / "ray" / "shards") == want
