"""The whole demo, as `make demo` runs it, into a fresh folder: wall time of each of its six steps,
the total, training seconds per step, and the per-family results table (model vs blind).

The demo's promise is <= 10 minutes after installation on 2 CPU cores, measured alone; on a
shared machine the per-step time shows how far contention stretched it.

Run: ``.venv/bin/python bench/demo.py`` (about as long as `make demo`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    exe = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        t0 = time.time()
        proc = subprocess.run([exe, "demo", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-3000:])
            return proc.returncode
        step = None
        for line in proc.stdout.splitlines():  # each step prints its header, then "  N s" at its end
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
        table = proc.stdout[proc.stdout.index("=== results") : proc.stdout.index("=== artifacts")]
        print(table.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
