"""Webdataset shards from http:// URLs (a 127.0.0.1 server the test runs) and pipe: commands read
the same samples as the local files, in training's stream, eval and curation; a shard cut
mid-read is retried, one that keeps failing is skipped and counted."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from data_tools.curate import run_curation
from data_tools.fixtures import encode, natural_image
from data_tools.httpfixture import LocalServer, Route
from data_tools.shards import ShardWriter
from mmsmall.data.shards import SampleStream, iter_samples, resolve_shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote_shards")
    with ShardWriter(out, prefix="toy", max_count=4) as w:
        for i in range(12):
            msgs = [{"role": "user", "content": "Describe this image."},
                    {"role": "assistant", "content": f"picture number {i} of a garden path"}]  # fmt: skip
            w.write(f"toy_{i:03d}", encode(natural_image(60 + i, (64, 48)), "JPEG"), "jpg",
                    {"id": f"toy{i:03d}", "task": "caption", "messages": msgs})  # fmt: skip
    return out


def _routes(shard_dir: Path, **override: Route) -> dict[str, Route]:
    routes = {
        f"/s/{p.name}": Route(p.read_bytes(), "application/x-tar") for p in sorted(shard_dir.glob("*.tar"))
    }
    routes["/s/manifest.json"] = Route((shard_dir / "manifest.json").read_bytes(), "application/json")
    return routes | override


def _ids(samples) -> list[tuple[str, bytes]]:
    return [(s["json"]["id"], s["image"].tobytes()) for s in samples]


def test_http_and_pipe_shards_read_like_local_files(shard_dir):
    local = _ids(iter_samples(shard_dir))
    assert len(local) == 12
    with LocalServer(_routes(shard_dir)) as srv:
        pattern = srv.url("/s/toy-{000000..000002}.tar")
        assert _ids(iter_samples(pattern)) == local
        assert _ids(iter_samples(srv.url("/s/"))) == local  # a folder URL: its manifest lists the shards
        assert len(resolve_shards(srv.url("/s/"))) == 3
        # training's stream: the same sample sequence from URLs as from the files
        streams = [SampleStream([{"path": p}], seed=3) for p in (str(shard_dir), pattern)]
        a, b = ([s["json"]["id"] for s in itertools.islice(st, 30)] for st in streams)
        assert a == b and len(set(a)) == 12
    assert _ids(iter_samples(f"pipe:cat {shard_dir}/toy-{{000000..000002}}.tar")) == local


def test_a_shard_cut_mid_read_is_retried_then_skipped_and_counted(shard_dir):
    first = (shard_dir / "toy-000001.tar").read_bytes()
    routes = _routes(shard_dir, **{
        "/s/toy-000001.tar": Route(first, "application/x-tar", fail_first=1, cut_after=1500),  # cut once
        "/s/toy-000002.tar": Route(b"x" * 4096, "application/x-tar", fail_first=99, cut_after=100),  # always
    })  # fmt: skip
    with LocalServer(routes) as srv:
        counters: dict[str, int] = {}
        got = [
            s["json"]["id"] for s in iter_samples(srv.url("/s/toy-{000000..000002}.tar"), counters=counters)
        ]
        assert srv.hits["/s/toy-000001.tar"] == 2 and srv.hits["/s/toy-000002.tar"] == 3  # 2 retries
    assert got == [f"toy{i:03d}" for i in range(8)] and counters == {"unreadable_tar": 1}
    counters = {}
    assert list(iter_samples("pipe:exit 3", counters=counters)) == [] and counters == {"unreadable_tar": 1}


def test_eval_and_curation_read_remote_shards(shard_dir, tmp_path):
    from eval.tasks.loaders import read_shard_records

    with LocalServer(_routes(shard_dir)) as srv:
        recs = read_shard_records(srv.url("/s/"), ("caption",), "remote")
        assert [r.id for r in recs] == [f"toy{i:03d}" for i in range(12)]
        runs = {}
        for name, path in (("local", str(shard_dir)), ("remote", srv.url("/s/toy-{000000..000002}.tar")),
                           ("pipe", f"pipe:cat {shard_dir}/toy-{{000000..000002}}.tar")):  # fmt: skip
            summary = run_curation({"inputs": [{"kind": "webdataset", "path": path, "name": "toy"}],
                                    "out_dir": str(tmp_path / name), "report": {"enabled": False}}, workers=1)  # fmt: skip
            runs[name] = (
                summary["n_kept"],
                {p.name: p.read_bytes() for p in (tmp_path / name).glob("*.tar")},
            )
    assert runs["local"][0] == 12 and runs["local"] == runs["remote"] == runs["pipe"]
    assert json.loads((tmp_path / "remote" / "manifest.json").read_text())["total"] == 12


@pytest.mark.slow
def test_training_on_remote_shards_equals_training_on_local_shards(shard_dir, tmp_path):
    """The same 4 DeepSpeed steps (tiny config) from the files and from their URLs: same losses, same samples."""
    import os
    import subprocess
    import sys

    from mmsmall.train.monitor import read_log

    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(root)
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    runs = {}
    with LocalServer(_routes(shard_dir)) as srv:
        for name, path in (("local", str(shard_dir)), ("remote", srv.url("/s/"))):
            out = tmp_path / name
            args = ["configs/train/tiny-pretrain.yaml", f"out_dir={out}", f"data.train=[{{path: '{path}'}}]",
                    "train.steps=4", "train.save_every=100", "train.tensorboard=false"]  # fmt: skip
            proc = subprocess.run([sys.executable, "-m", "mmsmall.train", *args], cwd=root, env=env,
                                  capture_output=True, text=True)  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            samples = (out / "samples_rank00000.jsonl").read_text().splitlines()
            runs[name] = ({r["step"]: r["loss"] for r in read_log(out / "log.jsonl")}, samples)
        assert srv.hits["/s/manifest.json"] >= 1
    assert len(runs["local"][0]) == 4 and runs["local"] == runs["remote"]
