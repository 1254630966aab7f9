"""Curation driver memory per candidate: the in-driver global pass vs the partitioned one.

    OMP_NUM_THREADS=1 .venv/bin/python bench/driver_memory.py --n 100000 --units 100

Builds ``--n`` synthetic candidates (LAION-like ids and 120-character captions, 10% repeated bytes,
near-duplicate pHashes, CLIP scores) as unit ``done.json`` files, then measures with ``tracemalloc``
the driver's peak for (a) loading every record + ``reduce_decisions`` (the reference) and (b)
``global_pass`` + the shard plan with its tasks in a 2-process pool (so only the driver is traced),
and the peak of one exact-dedup, key and near-dedup task run in this process (what a worker holds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

from data_tools.config import CurateConfig
from data_tools.curate import reduce_decisions
from data_tools.dedup import table_spans
from data_tools.executors import session
from data_tools.global_pass import PER_NEAR_PARTITION, exact_task, global_pass, keys_task, near_task
from data_tools.shard_tasks import shard_plan


def synth_units(work: Path, n: int, n_units: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    (work / "units").mkdir(parents=True)
    per = np.array_split(np.arange(n), n_units)
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64)
    near = rng.random(n) < 0.05  # 5%: one bit away from the previous candidate
    hashes[1:][near[1:]] = hashes[:-1][near[1:]] ^ np.uint64(1)
    units = []
    for u, rows in enumerate(per):
        cands = []
        for g in rows.tolist():
            same = int(rng.integers(n // 10)) if rng.random() < 0.1 else g + n  # 10%: bytes seen before
            sha = hashlib.sha256(str(same).encode()).hexdigest()
            ident = f"{rng.integers(10**12):012d}"
            cands.append({"pos": g - int(rows[0]), "id": ident, "source": "laion2b_en",
                          "text": ("a photo of " + "word " * 40)[:120], "sha256": sha, "ext": "jpg",
                          "phash": f"{int(hashes[g]):016x}", "clip": float(rng.normal(0.3, 0.05)),
                          "w": 512, "h": 384, "text_len": 120})  # fmt: skip
        uid = f"u{u:06d}"
        (work / "units" / f"{uid}.done.json").write_text(json.dumps({"uid": uid, "cands": cands}))
        units.append((uid, len(cands)))
    return units


def traced(fn):
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--units", type=int, default=100)
    args = ap.parse_args()
    cfg = CurateConfig()
    cfg.clip.enabled, cfg.clip.quantile = True, 0.1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        units = synth_units(work, args.n, args.units)

        def reference():
            stats = [json.loads((work / "units" / f"{u}.done.json").read_text()) for u, _ in units]
            return reduce_decisions(stats, cfg)

        ref, ref_peak = traced(reference)
        with session("local", 2):

            def partitioned():
                g = global_pass(units, cfg, work, "local", 2)
                shard_plan(
                    [u for u, _ in units], g["offsets"], g["kept_per_unit"], cfg.shard_size, g["parts"]
                )
                return g

            g, peak = traced(partitioned)
        assert sum(g["kept_per_unit"]) == len(ref["kept"]) and g["clip_threshold"] == ref["clip_threshold"]
        by_unit = [(u, int(o)) for (u, _), o in zip(units, g["offsets"][:-1].tolist())]
        _, exact_peak = traced(lambda: exact_task({"p": 0, "units": by_unit}, str(work)))
        _, keys_peak = traced(lambda: keys_task({"p": 0, "units": by_unit}, str(work)))
        spans = table_spans(cfg.dedup.max_distance, cfg.dedup.bands)[0]
        near = {"t": 0, "p": 0, "spans": spans, "units": by_unit}
        _, near_peak = traced(lambda: near_task(near, str(work), cfg.dedup.max_distance))
    n, per_part = args.n, args.n / g["parts"]
    print(f"candidates {n}, units {args.units}, partitions {g['parts']}, kept {len(ref['kept'])}")
    print(f"reference (reduce_decisions):   peak {ref_peak / 2**20:8.1f} MiB = {ref_peak / n:7.1f} B/cand")
    print(f"partitioned + shard plan:       peak {peak / 2**20:8.1f} MiB = {peak / n:7.1f} B/cand")
    print(f"one exact-dedup task: peak {exact_peak / 2**20:.1f} MiB = {exact_peak / per_part:.1f} B/cand")
    print(f"one key task:         peak {keys_peak / 2**20:.1f} MiB = {keys_peak / per_part:.1f} B/cand")
    per_near = args.n / max(2, -(-args.n // PER_NEAR_PARTITION))
    print(f"one near-dedup task:  peak {near_peak / 2**20:.1f} MiB = {near_peak / per_near:.1f} B/hash")


if __name__ == "__main__":
    main()
