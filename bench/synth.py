"""Synthetic data generation speed: images per second per core, for each generator.

One process, one thread (OMP_NUM_THREADS=1). Each generator writes real shards with
``data_tools.synth.generate`` (drawing, the independent check, PNG encoding, sha256, phash and
the tar write all count). Figures are images per CPU-second of this process (per core: what
``n`` processes would each do) and per wall-second (lower when the machine is shared).
Target: >= 10 charts/s/core. A short warm-up run per kind (imports, font caches) is not timed.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/synth.py`` (about 1 minute).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.synth import KINDS, generate  # noqa: E402
from data_tools.synth.scenes import EASY_COUNT  # noqa: E402

N = {"charts": 150, "docs": 150, "invoices": 60, "tables": 150, "clocks": 150, "scenes": 150}
TARGETS = {"charts": 10.0}  # images/s/core
EASY = EASY_COUNT


def measure(kind: str, n: int, **options) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(kind, 3, seed=999, out=Path(tmp) / "warm", **options)
        c0, w0 = time.process_time(), time.perf_counter()
        m = generate(kind, n, seed=1, out=Path(tmp) / "run", **options)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return n / cpu, n / wall, m["synth"]["dropped"]


def main() -> int:
    rows = [(kind, N[kind], {}) for kind in KINDS] + [("scenes (demo easy)", 300, EASY)]
    print(
        f"{'generator':<20} {'n':>5} {'img/s/core (cpu)':>17} {'img/s (wall)':>13} {'dropped':>8} {'target':>7} {'ratio':>6}"
    )
    for name, n, opts in rows:
        per_core, wall, dropped = measure(name.split()[0], n, **opts)
        target = TARGETS.get(name)
        extra = f"{target:>7.1f} {per_core / target:>5.2f}x" if target else f"{'-':>7} {'-':>6}"
        print(f"{name:<20} {n:>5} {per_core:>17.1f} {wall:>13.1f} {dropped:>8} {extra}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
