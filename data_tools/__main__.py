"""``python -m data_tools curate CONFIG [key=value ...] [--executor local|ray] [--workers N]``."""

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
    args = parser.parse_args(argv)
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
