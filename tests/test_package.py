"""The installable package: a built wheel holds the configs and the launcher, and a non-editable
install of it works from any directory; importing mmsmall (and its config and CLI) pulls no torch.

The shared venv has an editable mmsmall; the wheel is installed with ``pip install --target`` into
a folder put first on PYTHONPATH, and every command runs from an unrelated directory, so nothing
is found through the source tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ("mmsmall", "data_tools", "eval")


def _installed_env(site: Path) -> dict[str, str]:
    env = dict(
        os.environ, PYTHONPATH=str(site), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "PYTHON"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the build writes build/ and egg-info beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in PACKAGED:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(src),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("mmsmall-*.whl")
    return whl


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed (not editable) into a folder of its own."""
    site = tmp_path_factory.mktemp("site")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        "--target",
        str(site),
        str(wheel),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return site


def test_wheel_holds_configs_and_launcher(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "mmsmall" / "configs").rglob("*") if p.is_file()
    }
    assert {"mmsmall/configs/train/tiny-pretrain.yaml", "mmsmall/configs/deepspeed/zero2.json"} <= shipped
    assert shipped <= names, sorted(shipped - names)
    assert "mmsmall/launch/train.sh" in names
    for package in PACKAGED:
        assert f"{package}/__init__.py" in names
    assert "data_tools/synth/__init__.py" in names and "eval/tasks/__init__.py" in names


_RESOLVE = """
import mmsmall, sys
from types import SimpleNamespace
from mmsmall.config import load_config
from mmsmall.train.engine import read_ds_json
cfg = load_config("configs/train/tiny-pretrain.yaml")
path, ds = read_ds_json(SimpleNamespace(deepspeed=cfg.train.deepspeed))
print(mmsmall.__file__)
print(path)
print(cfg.model.connector.__class__.__name__, ds["zero_optimization"]["stage"])
"""


def test_installed_wheel_runs_from_any_directory(site, tmp_path):
    env, cwd = _installed_env(site), tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run(
        [str(site / "bin" / "mmsmall"), "--help"], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo" in proc.stdout and "train" in proc.stdout and "--verbose" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", _RESOLVE], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, ds_json, summary = proc.stdout.split("\n")[:3]
    assert Path(package).is_relative_to(site), package  # the installed copy, not the source tree
    assert Path(ds_json) == site / "mmsmall" / "configs" / "deepspeed" / "zero2.json"
    assert summary == "ConnectorConfig 2"
    # a config that is neither a file here nor shipped is still reported by its name
    proc = subprocess.run(
        [str(site / "bin" / "mmsmall"), "train", "configs/train/no-such.yaml"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "configs/train/no-such.yaml" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_from_any_directory(site, tmp_path):
    """`mmsmall demo --quick --out X` of the installed wheel, from an unrelated directory: synthesis,
    curation, training through the shipped launch/train.sh with the shipped YAML and DeepSpeed json,
    eval and export, with third-party INFO quiet."""
    env, cwd = _installed_env(site), tmp_path / "elsewhere"
    cwd.mkdir()
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    out_dir = tmp_path / "demo"
    cmd = [str(site / "bin" / "mmsmall"), "demo", "--quick", "--out", str(out_dir)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((out_dir / "demo_results.json").read_text())
    assert {row["task"] for row in result["table"]} >= {"synth_scenes_count", "synth_charts"}
    assert (out_dir / "release" / "config.json").exists() and (out_dir / "run" / "model").is_dir()
    assert not (cwd / "configs").exists() and list(cwd.iterdir()) == []  # nothing written where it ran
    out = proc.stdout + proc.stderr
    assert "Parsing model identifier" not in out  # third-party INFO stays quiet without -v


def test_import_pulls_no_torch():
    code = "import sys, mmsmall, mmsmall.config, mmsmall.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


_LOGS = """
import logging
from mmsmall.logs import setup_logging
setup_logging()
logging.info("third-party root INFO")  # as open_clip logs "Parsing model identifier"
logging.getLogger("DeepSpeed").info("deepspeed INFO")
logging.getLogger("mmsmall.train").info("our INFO")
logging.getLogger("eval").info("eval INFO")
logging.warning("third-party WARNING")
"""


def test_third_party_info_logs_are_quiet_unless_verbose():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MMSMALL_VERBOSE", None)
    quiet = subprocess.run([sys.executable, "-c", _LOGS], env=env, capture_output=True, text=True).stderr
    assert "our INFO" in quiet and "eval INFO" in quiet and "third-party WARNING" in quiet
    assert "third-party root INFO" not in quiet and "deepspeed INFO" not in quiet
    loud = subprocess.run(
        [sys.executable, "-c", _LOGS], env=env | {"MMSMALL_VERBOSE": "1"}, capture_output=True, text=True
    ).stderr
    assert "third-party root INFO" in loud and "our INFO" in loud
    from typer.testing import CliRunner

    from mmsmall.cli import app

    before = os.environ.pop("MMSMALL_VERBOSE", None)
    try:
        assert CliRunner().invoke(app, ["-v", "eval", "--list-tasks"]).exit_code == 0
        assert os.environ.get("MMSMALL_VERBOSE") == "1"  # -v reaches the processes a command starts
    finally:
        os.environ.pop("MMSMALL_VERBOSE", None)
        if before is not None:
            os.environ["MMSMALL_VERBOSE"] = before
