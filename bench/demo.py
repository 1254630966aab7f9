"""The whole demo, as `make demo` runs it, into a fresh folder: wall time of each of its six steps,
the total, training seconds per step, the per-family results table and the verdict.

    python bench/demo.py                # one run on this CPU as it is
    python bench/demo.py --isa all      # the same demo under each instruction set this CPU offers

``--isa`` measures how far the table moves between CPUs. One machine stands in for others by
capping the instruction sets its math libraries may use: PyTorch's own kernels
(``ATEN_CPU_CAPABILITY``), MKL's (``MKL_ENABLE_INSTRUCTIONS``: the matrix products) and oneDNN's
(``ONEDNN_MAX_CPU_ISA``), together, as a CPU without the wider units would run them. Each setting
is a full demo (synthesis and curation are the same bytes on every setting; training and
evaluation round differently); the spread per family is printed last, the figures README.md's
spread table and the full-demo test's bounds come from.

The demo's promise is about 10 minutes after installation on 2 CPU cores, measured alone; on a
shared machine the per-step time shows how far contention stretched it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> the variables that cap every math library at that instruction set
ISAS = {
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}  # fmt: skip


def offered() -> list[str]:
    """The settings of ISAS this CPU can run (its flags hold the wider units)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = ["default"]
    if " avx2" in flags:
        names.append("avx2")
    if " avx512f" in flags:
        names.append("avx512")
    return names


def run_once(out: Path, env: dict[str, str]) -> tuple[float, str, dict]:
    """One `mmsmall demo --out out` under ``env``; returns (wall seconds, stdout, demo_results.json)."""
    exe = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"
    t0 = time.time()
    proc = subprocess.run(
        [exe, "demo", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"demo failed under {env}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.time() - t0, proc.stdout, json.loads((out / "demo_results.json").read_text())


def print_timing(out: Path, stdout: str, wall: float) -> None:
    step = None
    for line in stdout.splitlines():  # each step prints its header, then "  N s" at its end
        if re.match(r"=== \d/6 ", line):
            step = line[4:64]
        elif step and (m := re.search(r"(?:^  |\()(\d+) s\)?$", line)):
            print(f"  {step:<60} {int(m.group(1)):>5} s")
            step = None
    log = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    per_step = sorted(r["step_time_s"] for r in log)
    print(
        f"  training: {log[-1]['step']} steps, median {per_step[len(per_step) // 2]:.3f} s/step (logged steps)"
    )
    print(f"demo wall time: {wall / 60:.1f} min")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", default=None, help=f"'all' or comma-separated of {', '.join(ISAS)}")
    args = ap.parse_args(argv)
    from mmsmall.demo import results_markdown, verdict

    names = [None] if args.isa is None else (offered() if args.isa == "all" else args.isa.split(","))
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / (name or "demo")
            if tables:  # the same seeds give the same synthetic shards: reuse the first run's
                shutil.copytree(Path(tmp) / next(iter(tables)) / "synth", out / "synth")
            env = ISAS[name] if name else {}
            wall, stdout, result = run_once(out, env)
            print(f"== {name or 'this CPU as it is'} {' '.join(f'{k}={v}' for k, v in env.items())}")
            print_timing(out, stdout, wall)
            print(results_markdown(result["table"]))
            failed = verdict(result["table"])
            print(
                "verdict: "
                + (
                    "; ".join(f"{t}: {w}" for t, w in failed.items())
                    if failed
                    else "every family read from the image"
                )
            )
            tables[name or "demo"] = {r["task"]: r for r in result["table"]}
            sys.stdout.flush()
    if len(tables) > 1:
        print("\n=== spread of the model's score over instruction sets")
        print("| task                 | " + " | ".join(f"{n:>7}" for n in tables) + " |   range   |")
        for task in next(iter(tables.values())):
            scores = [t[task]["model"] for t in tables.values()]
            cells = " | ".join(f"{s:>7.1f}" for s in scores)
            print(f"| {task:<20} | {cells} | {min(scores):.1f}–{max(scores):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
