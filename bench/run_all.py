"""Run every benchmark under bench/ and write bench/RESULTS.md (machine, date, figures).

Each script prints its own side-by-side figures and ratios; this collects their output.
`make bench` runs it. A script that fails or runs past its time limit is recorded as such.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT_S = int(os.environ.get("BENCH_TIMEOUT_S", "600"))


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · {gpu} · torch {torch.__version__} · Python {platform.python_version()}"


def main() -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_"))
    lines = [
        "# Benchmark results",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        "- command: `make bench` (runs `python bench/run_all.py`)",
        "",
    ]
    failed = 0
    for script in scripts:
        print(f"== {script.name}", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(
                [sys.executable, str(script)],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                cwd=HERE.parent,
            )
            output, status = (
                proc.stdout + proc.stderr[-2000:],
                "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
            )
            failed += proc.returncode != 0
        except subprocess.TimeoutExpired as e:
            output, status = (
                (e.stdout or b"").decode(errors="replace")
                if isinstance(e.stdout, bytes)
                else (e.stdout or ""),
                f"timed out after {TIMEOUT_S}s",
            )
            failed += 1
        print(output, flush=True)
        lines += [
            f"## {script.name} ({status}, {time.time() - t0:.0f} s)",
            "",
            "```",
            output.strip(),
            "```",
            "",
        ]
    (HERE / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
