"""Results as files: ``results.json``, a markdown table, and a bar chart comparing runs.

python -m eval.report runs/a/eval/results.json runs/b/eval/results.json --out compare.png
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path


def markdown_table(results: dict | Sequence[dict], names: Sequence[str] | None = None) -> str:
    """One row per run, one column per task (headline metric, as a percentage)."""
    runs = [results] if isinstance(results, dict) else list(results)
    names = list(names) if names else [r.get("model", f"run{i}") for i, r in enumerate(runs)]
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r.get("tasks", {}) if t not in tasks]
    header = "| model | " + " | ".join(
        f"{t} ({_primary(runs, t)})" for t in tasks
    ) + " |\n|---|" + "---:|" * len(tasks)  # fmt: skip
    rows = []
    for name, r in zip(names, runs):
        cells = []
        for t in tasks:
            entry = r.get("tasks", {}).get(t)
            cells.append("–" if entry is None else f"{entry['score']:.1f}")
        rows.append(f"| {name}{_baseline(r)} | " + " | ".join(cells) + " |")
    return header + "\n" + "\n".join(rows) + "\n"


def _primary(runs: Sequence[dict], task: str) -> str:
    for r in runs:
        if task in r.get("tasks", {}):
            return r["tasks"][task]["primary"]
    return ""


def write_reports(results: dict, out: str | os.PathLike) -> None:
    """``results.json`` and ``results.md`` under ``out`` (written atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n"),
        ("results.md", f"Convention: {results.get('convention', '')}\n\n" + markdown_table(results)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


def compare(results_paths: Sequence[str | os.PathLike], out_png: str | os.PathLike, names=None) -> Path:
    """A grouped bar chart (one group per task, one bar per run) of the headline scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = []
    for p in results_paths:
        try:
            runs.append(json.loads(Path(p).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable results.json ({e})") from None
    names = list(names) if names else [_run_name(p, r) for p, r in zip(results_paths, runs)]
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r.get("tasks", {}) if t not in tasks]
    if not tasks:
        raise ValueError(f"no task results in {list(map(str, results_paths))}")
    width = 0.8 / len(runs)
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * max(1, len(runs) / 2)), 4.0))
    for i, (name, r) in enumerate(zip(names, runs)):
        vals = [r.get("tasks", {}).get(t, {}).get("score", np.nan) for t in tasks]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [f"{t}\n({_primary(runs, t)})" for t in tasks], fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _run_name(path, results: dict) -> str:
    name = Path(str(results.get("model", ""))).name or Path(path).parent.name
    return name + _baseline(results)


def _baseline(results: dict) -> str:
    """The suffix naming a baseline run: grey images (blind) or other samples' images."""
    return " (blind)" if results.get("blind") else " (other images)" if results.get("other_images") else ""


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m eval.report", description="Compare several results.json files."
    )
    ap.add_argument("results", nargs="+", help="results.json files")
    ap.add_argument("--out", required=True, help="PNG file to write")
    ap.add_argument("--names", default=None, help="comma-separated run names (default: model folder names)")
    args = ap.parse_args(argv)
    names = args.names.split(",") if args.names else None
    runs = [json.loads(Path(p).read_text()) for p in args.results]
    print(markdown_table(runs, names or [_run_name(p, r) for p, r in zip(args.results, runs)]))
    print(f"wrote {compare(args.results, args.out, names)}")


if __name__ == "__main__":
    main()
