"""The `mmsmall` command: wrong input gives a clear error and an exit code, not a traceback."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run([EXE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_train_config_typo_names_valid_keys_before_launching():
    proc = _run("train", "configs/train/tiny-pretrain.yaml", "train.lr.conector=1e-3")
    assert proc.returncode == 2
    assert "unknown config key train.lr.conector" in proc.stderr
    assert "valid keys under train.lr: connector, llm, vision" in proc.stderr
    assert "Traceback" not in proc.stderr and "deepspeed" not in proc.stdout.lower()


def test_unknown_synth_kind_lists_valid_kinds(tmp_path):
    proc = _run("synth", "chartz", "--n", "1", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "unknown synth kind 'chartz'" in proc.stderr and "charts, clocks, docs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "manifest.json").exists()
