"""`mmsmall download` against img2dataset 1.47, side by side in one run (not a test).

    .venv/bin/python bench/download.py [--urls 5000] [--latency 0.05] [--concurrency 64]
        [--i2d-venv /tmp/i2d] [--i2d-processes 2] [--i2d-threads 64] [--shard-rows 1000]

One local server (127.0.0.1, a thread per request) waits ``--latency`` seconds before each answer,
like a remote host, and serves ``--urls`` distinct URLs (16 JPEGs of 256x192 behind them; 1 in 32 a
404 and 1 in 32 an HTML page). Both tools read the same parquet (``url``, ``caption``) and write
webdataset shards of ``--shard-rows`` samples (image + caption + json):

- ours: ``python -m data_tools download ROWS --out DIR --shard-rows N --concurrency C --per-host C``
  (one process, one fetch loop; every body checked to be an image, its bytes kept), and, for
  context, the same with ``--workers 2`` (two shards at a time in two processes);
- img2dataset: ``img2dataset --input_format parquet --output_format webdataset --resize_mode no
  --skip_reencode True`` (its bytes kept too: no resizing or re-encoding; it still decodes each
  image for its size), ``--processes_count P --thread_count T``; and, for context, the least it can
  do: ``--disable_all_reencoding True`` (bytes stored undecoded, so its HTML pages are kept as images).

Each runs as a child process, alone. Measured per tool: images written (samples in its tars),
wall-clock images/s, CPU seconds (user + system of the child and everything it waited for, from
``wait4``), images per CPU second (= images/s per core fully used: the "per core" figure, which does
not depend on how many cores the machine has), and peak memory (PSS summed over the child's process
tree, sampled every 0.1 s: PSS splits pages shared between forked workers, so a pool is not counted
twice). Target: ours >= 1.5x img2dataset's images/s per core at equal or lower peak memory.

img2dataset lives in its own virtual environment (``--i2d-venv``), created and filled with
``pip install img2dataset==1.47.0`` on first use and reused after; it is not a dependency of this
project. A failed install is printed and the run measures ours alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_tools.fixtures import encode, natural_image  # noqa: E402
from data_tools.httpfixture import LocalServer, Route  # noqa: E402

I2D_VERSION = "1.47.0"


def ensure_img2dataset(venv: Path) -> Path | None:
    """The img2dataset executable of ``venv``, installing it there first when missing."""
    exe = venv / "bin" / "img2dataset"
    if exe.exists():
        return exe
    print(f"installing img2dataset=={I2D_VERSION} into {venv} (once) ...", flush=True)
    steps = ([sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "-q", f"img2dataset=={I2D_VERSION}"])  # fmt: skip
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"img2dataset could not be installed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
            return None
    return exe if exe.exists() else None


def _tree_pss(pid: int) -> int:
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd`` to its end: wall seconds, CPU seconds (wait4) and peak PSS of its tree (bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak": peak[0]}


def count_images(folder: Path) -> int:
    n = 0
    for t in folder.rglob("*.tar"):
        with tarfile.open(t) as tar:
            n += sum(m.name.endswith((".jpg", ".jpeg", ".png", ".webp")) for m in tar.getmembers())
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--urls", type=int, default=5000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=64, help="ours: requests in flight")
    ap.add_argument("--i2d-venv", type=Path, default=Path(tempfile.gettempdir()) / "i2d")
    ap.add_argument("--i2d-processes", type=int, default=2)
    ap.add_argument("--i2d-threads", type=int, default=64, help="img2dataset: threads per process")
    ap.add_argument("--shard-rows", type=int, default=1000)
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    i2d = ensure_img2dataset(args.i2d_venv)
    bodies = [encode(natural_image(s, (256, 192)), "JPEG") for s in range(16)]
    routes, n_ok = {}, 0
    for i in range(args.urls):
        if i % 32 == 7:
            continue  # a 404
        html = i % 32 == 21
        routes[f"/img{i}.jpg"] = Route(b"<html>moved</html>", "text/html") if html else Route(bodies[i % 16])
        n_ok += not html
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    results: dict[str, dict] = {}
    with LocalServer(routes, latency_s=args.latency) as srv, tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.parquet"
        urls = [srv.url(f"/img{i}.jpg") for i in range(args.urls)]
        pq.write_table(pa.table({"url": urls, "caption": [f"picture {i}" for i in range(args.urls)]}), rows)
        runs = {
            "mmsmall download": [sys.executable, "-m", "data_tools", "download", str(rows), "--out",
                                 f"{tmp}/OUT", "--shard-rows", str(args.shard_rows), "--concurrency",
                                 str(args.concurrency), "--per-host", str(args.concurrency)],
        }  # fmt: skip
        # for context: two shards at a time in two processes, as img2dataset's two processes do
        runs["mmsmall --workers 2"] = [*runs["mmsmall download"], "--workers", "2"]
        if i2d is not None:
            runs["img2dataset 1.47"] = [
                str(i2d), "--url_list", str(rows), "--input_format", "parquet", "--url_col", "url",
                "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", f"{tmp}/OUT",
                "--processes_count", str(args.i2d_processes), "--thread_count", str(args.i2d_threads),
                "--number_sample_per_shard", str(args.shard_rows), "--resize_mode", "no", "--skip_reencode",
                "True", "--retries", "0", "--timeout", "10",
            ]  # fmt: skip
            # the least img2dataset can do: bytes stored undecoded (HTML pages too), for context
            runs["img2dataset no-decode"] = [*runs["img2dataset 1.47"][:-6], "--disable_all_reencoding", "True",
                                             "--retries", "0", "--timeout", "10"]  # fmt: skip
        for name, cmd in runs.items():
            out = Path(tmp) / f"out{len(results)}"
            res = measure([c.replace(f"{tmp}/OUT", str(out)) for c in cmd], env)
            res["images"] = count_images(out)
            results[name] = res
    print(
        f"image URL download to webdataset shards: {args.urls} URLs ({n_ok} images), "
        f"{args.latency * 1000:.0f} ms latency per request, {os.cpu_count()} cores"
    )
    print(
        f"  {'':<20}{'images':>8}{'wall s':>9}{'images/s':>10}{'CPU s':>8}{'img/s/core':>12}{'peak MiB':>10}"
    )
    for name, r in results.items():
        print(f"  {name:<20}{r['images']:>8d}{r['wall']:>9.1f}{r['images'] / r['wall']:>10.1f}{r['cpu']:>8.1f}"
              f"{r['images'] / max(r['cpu'], 1e-9):>12.1f}{r['peak'] / 2**20:>10.0f}")  # fmt: skip
    if len(results) > 1:
        ours, peer = results["mmsmall download"], results["img2dataset 1.47"]
        per_core = (ours["images"] / ours["cpu"]) / (peer["images"] / peer["cpu"])
        wall = (ours["images"] / ours["wall"]) / (peer["images"] / peer["wall"])
        mem = ours["peak"] / peer["peak"]
        verdict = "met" if per_core >= 1.5 and mem <= 1.0 else "NOT met"
        print(f"  images/s per core: {per_core:.2f}x img2dataset (target >= 1.5x); wall images/s {wall:.2f}x")
        print(f"  peak memory: {mem:.2f}x img2dataset (target <= 1.0x); target {verdict}")
        raw = results["img2dataset no-decode"]
        print(
            f"  against img2dataset --disable_all_reencoding (no image check; its HTML pages kept as .jpg): "
            f"{(ours['images'] / ours['cpu']) / (raw['images'] / raw['cpu']):.2f}x per core, "
            f"{ours['peak'] / raw['peak']:.2f}x memory"
        )
    else:
        print("  img2dataset not available: no ratio")


if __name__ == "__main__":
    main()
