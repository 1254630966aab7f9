"""``python -m data_tools curate CONFIG [key=value ...] [--executor local|ray] [--workers N]``;
``python -m data_tools download ROWS --out DIR [--url-field url] [--output webdataset|files]
[--executor local|ray] [--retry-failed]``."""

from __future__ import annotations

import argparse
import json
import sys

from mmsmall.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description="mmsmall data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    cur = sub.add_parser("curate", help="curate inputs into webdataset shards with a report")
    cur.add_argument("config", help="curation YAML, e.g. configs/curate/example.yaml")
    cur.add_argument("overrides", nargs="*", help="dotted overrides such as dedup.max_distance=6")
    cur.add_argument("--executor", choices=("local", "ray"), default="local")
    cur.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    dl = sub.add_parser("download", help="fetch the image URLs of a parquet/jsonl/csv file of rows")
    dl.add_argument("rows", help="parquet file or folder, .jsonl or .csv with a URL column")
    dl.add_argument(
        "--out", required=True, help="folder for shards/ (or, with --output files, images/ + images.jsonl)"
    )
    dl.add_argument("--url-field", default="url", help="URL column (PixMo: image_url)")
    dl.add_argument("--sha256-field", default="sha256", help="expected-sha256 column (PixMo: image_sha256)")
    dl.add_argument("--concurrency", type=int, default=64, help="requests in flight in total")
    dl.add_argument("--per-host", type=int, default=16, help="requests in flight to one host")
    dl.add_argument("--timeout", type=float, default=30.0, help="read timeout in seconds")
    dl.add_argument("--deadline", type=float, default=None, help="seconds one attempt may take (default 120)")
    dl.add_argument("--retries", type=int, default=3, help="retries on 429/5xx/timeouts")
    dl.add_argument("--max-bytes", type=int, default=20 * 1024 * 1024, help="size cap per image")
    dl.add_argument("--retry-failed", action="store_true", help="fetch again only what failed last time")
    dl.add_argument(
        "--output",
        choices=("webdataset", "files"),
        default="webdataset",
        help="webdataset: shards/*.tar (image, txt, json; the default); files: images/ + images.jsonl",
    )
    dl.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="ray: the shards run as tasks on the Ray cluster (RAY_ADDRESS) curation uses",
    )
    dl.add_argument("--workers", type=int, default=None, help="shards in flight: local processes (default 1), or Ray tasks (default: the cluster's CPUs)")  # fmt: skip
    dl.add_argument("--shard-rows", type=int, default=10_000, help="webdataset: rows per shard")
    dl.add_argument(
        "--caption-field", default="caption", help="webdataset: column written as .txt (LAION: TEXT)"
    )
    args = parser.parse_args(argv)
    if args.command == "download":
        from .download import DownloadConfig, download

        cfg = DownloadConfig(
            url_field=args.url_field, sha256_field=args.sha256_field, concurrency=args.concurrency,
            per_host=args.per_host, read_timeout_s=args.timeout, retries=args.retries, max_bytes=args.max_bytes,
            output=args.output, shard_rows=args.shard_rows, caption_field=args.caption_field,
            **({"deadline_s": args.deadline} if args.deadline else {}),
        )  # fmt: skip
        try:
            report = download(args.rows, args.out, cfg, retry_failed=args.retry_failed, executor=args.executor,
                              workers=args.workers)  # fmt: skip
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(report, indent=2))
        return 0
    if args.command == "curate":
        from .curate import run_curation

        try:
            summary = run_curation(args.config, args.overrides, executor=args.executor, workers=args.workers)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        keys = ("n_in", "n_kept", "dropped", "units", "units_resumed", "out_dir", "report")
        print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
