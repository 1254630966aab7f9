"""Image URL download throughput against a local server with injected latency (not a test).

    .venv/bin/python bench/download.py [--images 640] [--latency 0.05] [--concurrency 64]

The server (127.0.0.1, one thread per request) waits ``--latency`` seconds before each answer,
like a remote host; 1 in 32 URLs is a 404 and 1 in 32 an HTML page, so the failure counts by
reason are printed too. Compared: a plain sequential ``requests`` loop (with the same content-type
and size checks skipped, so it is the fastest a sequential loop can be) against
``data_tools.download`` at ``--concurrency`` requests in flight (one host, so ``per_host`` is set
to the same number). Target: >= 20x at 64 concurrent.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import requests

from data_tools.download import DownloadConfig, download
from data_tools.fixtures import encode, natural_image, write_jsonl
from data_tools.httpfixture import LocalServer, Route


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=64, help="URLs timed in the sequential loop")
    args = ap.parse_args()
    bodies = [encode(natural_image(s, (256, 192)), "JPEG") for s in range(16)]
    routes = {}
    for i in range(args.images):
        if i % 32 == 7:
            continue  # a 404
        routes[f"/img{i}.jpg"] = (
            Route(b"<html>moved</html>", "text/html") if i % 32 == 21 else Route(bodies[i % len(bodies)])
        )
    with LocalServer(routes, latency_s=args.latency) as srv, tempfile.TemporaryDirectory() as tmp:
        urls = [srv.url(f"/img{i}.jpg") for i in range(args.images)]
        t0 = time.perf_counter()
        with requests.Session() as s:
            for u in urls[: args.sequential]:
                r = s.get(u, timeout=30)
                _ = r.content
        seq = args.sequential / (time.perf_counter() - t0)
        write_jsonl(Path(tmp) / "rows.jsonl", [{"url": u, "caption": "x"} for u in urls])
        cfg = DownloadConfig(concurrency=args.concurrency, per_host=args.concurrency)
        t0 = time.perf_counter()
        report = download(Path(tmp) / "rows.jsonl", Path(tmp) / "out", cfg)
        conc = args.images / (time.perf_counter() - t0)
    print(
        f"image URL download, {args.images} URLs, {args.latency * 1000:.0f} ms injected latency per request"
    )
    print(f"  sequential requests loop ({args.sequential} URLs)      {seq:10.1f} images/s")
    print(f"  data_tools.download, {args.concurrency} concurrent          {conc:10.1f} images/s")
    print(f"  speed-up                                     {conc / seq:10.1f}x (target >= 20x)")
    print(f"  ok {report['n_ok']} / {report['n_in']}; failures by reason:")
    for reason, n in report["failed"].items():
        print(f"    {reason:<28} {n:6d}")


if __name__ == "__main__":
    main()
