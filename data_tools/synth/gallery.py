"""A gallery of synthetic samples, in the curation report's format (``data_tools.report``).

    python -m data_tools.synth.gallery SHARD_DIR OUT_DIR [--n 24]

writes ``OUT_DIR/{slug}.html`` (self-contained) and ``{slug}.png`` with each sample's image,
its id and task, and its question -> answer.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from data_tools.report import write_gallery
from data_tools.shards import read_manifest
from mmsmall.data.shards import iter_samples


def synth_gallery(shard_dir: str | Path, out_dir: str | Path, n: int = 24, title: str | None = None) -> Path:
    """Gallery of the first ``n`` samples of a synth shard folder; returns the HTML path."""
    manifest = read_manifest(shard_dir)
    info = manifest.get("synth", {})
    title = title or f"synth {info.get('kind', '?')} {info.get('split', '')} seed {info.get('seed', '?')}"
    counters: dict[str, int] = {}
    cells = []
    for s in itertools.islice(iter_samples(shard_dir, counters=counters), n):
        rec = s["json"]
        q, a = rec["messages"][0]["content"], rec["messages"][1]["content"]
        cells.append(
            {
                "image": s["image"],
                "label": f"{rec['task']} {rec['id'].rsplit('-', 1)[-1]}",
                "caption": f"Q: {q} A: {a}",
            }
        )
    return write_gallery(cells, out_dir, title, cols=6, thumb=200)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shard_dir")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=24)
    args = p.parse_args(argv)
    print(synth_gallery(args.shard_dir, args.out_dir, args.n))


if __name__ == "__main__":
    main()
