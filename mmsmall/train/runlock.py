"""One run per ``out_dir``: an exclusive ``flock`` on ``out_dir/run.lock``, held for the whole run.

Rank 0 takes the lock before it writes anything into ``out_dir`` and keeps it until its process
ends; the kernel releases a ``flock`` when its holder dies, so a run killed with SIGKILL leaves
a lock file the restart simply takes over (it logs whose it was). The file holds the holder's
pid, host and start time, so a second run started while the first lives is refused with them.
``probe`` is the launcher's early check (launch/train.sh, before DeepSpeed starts any rank): it
takes the lock and lets it go at once, refusing where another run holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from mmsmall.config import ConfigError

LOCK_NAME = "run.lock"


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _refusal(out_dir: Path, holder: dict) -> ConfigError:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
    return ConfigError(
        f"out_dir {out_dir} is in use by another run ({who}); wait for it to end or stop it, "
        "or give this run another out_dir"
    )


def _try_lock(path: Path) -> int | None:
    """An open fd holding the exclusive lock on ``path``, or None where another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def probe(out_dir: str | Path) -> None:
    """Refuse (ConfigError naming the holder) when a live run holds ``out_dir``; writes nothing."""
    path = Path(out_dir) / LOCK_NAME
    if not path.is_file():
        return
    fd = _try_lock(path)
    if fd is None:
        raise _refusal(Path(out_dir), _holder(path))
    os.close(fd)


class RunLock:
    """The lock of one run on ``out_dir`` (creates the folder); ``release`` or process exit frees it."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / LOCK_NAME
        fd = _try_lock(self.path)
        if fd is None:
            raise _refusal(self.out_dir, _holder(self.path))
        self.fd = fd
        self.previous = _holder(self.path)  # a killed run's record: the lock was free, so it is over
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
