"""A virtual environment with lmms-eval for the backend tests, built once and cached.

lmms-eval 0.7.3 cannot go into the project's own environment: it needs ``filelock<4`` (its evaluator
imports ``filelock._api``, gone in filelock 4, which ours has) and pins ``wandb==0.25.0`` and newer
``protobuf``. So the tests run it from ``.cache/lmms-venv`` (``$MMSMALL_LMMS_VENV`` to move it):
a venv that sees our environment's packages through a ``.pth`` line (torch, transformers, datasets
are not installed twice), holds lmms-eval and what it adds or pins over them, and has this checkout
installed editable without dependencies, so ``lmms_eval --model mmsmall`` finds our entry point.
It is rebuilt when pyproject.toml, the checkout or the base environment changes (~1 minute).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LMMS_EVAL = "lmms-eval==0.7.3"
PINS_OVER_OURS = ("filelock<4",)  # lmms_eval.evaluator imports filelock._api (filelock 3.x)


def lmms_venv() -> Path:
    """The venv's python, built or reused."""
    venv = Path(os.environ.get("MMSMALL_LMMS_VENV") or ROOT / ".cache" / "lmms-venv")
    base = sysconfig.get_paths()["purelib"]
    key = "\n".join(
        [
            LMMS_EVAL,
            *PINS_OVER_OURS,
            str(ROOT),
            base,
            hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest(),
        ]
    )
    stamp = venv / "mmsmall-stamp"
    python = venv / "bin" / "python"
    if stamp.exists() and stamp.read_text() == key and python.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)])
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())  # fmt: skip
    (site / "_mmsmall_base_env.pth").write_text(base + "\n")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, LMMS_EVAL, *PINS_OVER_OURS])
    _run([*pip, "--no-deps", "-e", str(ROOT)])
    stamp.write_text(key)
    return python


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(
            f"building the lmms-eval venv: {' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
