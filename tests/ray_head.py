"""A real Ray head on 127.0.0.1 for tests, and a driver command run against it (curation, download).

``with ray_head(root) as env: run_driver(cmd, env, root)``: `ray start --head` (2 CPUs) in its own
process group, stopped by signalling that group (not `ray stop`, which stops every Ray on the host).
Loopback only: Ray rewrites 127.0.0.1 in RAY_ADDRESS to the machine's outward IP unless clusters are
confined to this host, which RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read by the head, its workers and
the driver) does. The head uses token authentication (Ray's default); the driver gets the token.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(root: Path, cpus: int = 2) -> Iterator[dict[str, str]]:
    """Start the head; yield the environment a driver joins it with (RAY_ADDRESS and the token)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_ADDRESS": f"127.0.0.1:{port}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"],
        env={k: v for k, v in env.items() if k != "RAY_ADDRESS"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def run_driver(cmd: list[str], env: dict[str, str], root: Path) -> subprocess.CompletedProcess:
    """Run a driver command against the head, retrying while the head does not accept drivers yet
    (it takes a while on a busy machine)."""
    deadline, out = time.time() + 240, None
    while time.time() < deadline:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode == 0 or "connect" not in out.stderr.lower():
            break
        time.sleep(2)
    assert out is not None and out.returncode == 0, out.stderr[-3000:]
    return out
