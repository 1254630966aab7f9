"""The Ray executor on a running Ray cluster gives the same shards as the local executor."""

from __future__ import annotations

import json
import os

import pytest

from data_tools.curate import run_curation
from data_tools.fixtures import build_curation_fixture

ray = pytest.importorskip("ray", reason="Ray is the `distributed` extra: pip install 'mmsmall[distributed]'")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_curate_against_a_running_ray_cluster_matches_local(tmp_path):
    """`ray start --head` (2 CPUs, 127.0.0.1), then `mmsmall curate --executor ray --workers 2` with
    RAY_ADDRESS: byte-identical shards to the local executor. The cluster runs in its own process
    group and is stopped by signalling that group (not `ray stop`, which stops every Ray on the host)."""
    import secrets
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    cfg, _ = build_curation_fixture(tmp_path / "data", n_good=4)
    cfg |= {"report": {"enabled": False}, "unit_size": 3}
    local = run_curation({**cfg, "out_dir": str(tmp_path / "local")}, workers=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "out_dir": str(tmp_path / "ray")}))
    port = _free_port()
    # Loopback only: Ray rewrites 127.0.0.1 in RAY_ADDRESS to the machine's outward IP unless clusters
    # are confined to this host, which RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read by the head, its workers
    # and the driver) does. The head uses token authentication (Ray's default); the driver gets the token.
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_ADDRESS": f"127.0.0.1:{port}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"],
        env={k: v for k, v in env.items() if k != "RAY_ADDRESS"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        cmd = [sys.executable, "-m", "mmsmall.cli", "curate", str(tmp_path / "cfg.yaml"), "--executor", "ray",
               "--workers", "2"]  # fmt: skip
        deadline, out = time.time() + 240, None
        while time.time() < deadline:  # the head takes a while to accept drivers on a busy machine
            out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
            if out.returncode == 0 or "connect" not in out.stderr.lower():
                break
            time.sleep(2)
        assert out is not None and out.returncode == 0, out.stderr[-3000:]
        summary = json.loads(out.stdout)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    assert summary["n_in"] == local["n_in"] and summary["dropped"] == local["dropped"]
    tars = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").glob("*.tar"))}
    assert tars and tars == {p.name: p.read_bytes() for p in sorted((tmp_path / "ray").glob("*.tar"))}
