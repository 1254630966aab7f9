"""Files shipped inside the package: the YAML/JSON configs and the DeepSpeed launcher.

They live in ``mmsmall/configs/`` and ``mmsmall/launch/`` (a checkout links ``configs/`` and
``launch/`` at its root to them), so an installed wheel finds them as a source checkout does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
LAUNCHER = PACKAGE_DIR / "launch" / "train.sh"


def find_config(path: str | Path) -> Path:
    """``path`` as given when it exists, else the same file among the shipped configs.

    ``configs/train/tiny-pretrain.yaml`` and ``train/tiny-pretrain.yaml`` both name the shipped
    file from any directory; a path that is neither is returned unchanged (its reader reports it).
    """
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    shipped = CONFIGS_DIR.joinpath(*parts) if parts else CONFIGS_DIR
    return shipped if shipped.exists() else path


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``bash LAUNCHER``: the interpreter running now trains (the same install)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHON", sys.executable)
    return env


def torch_extensions_dir() -> Path:
    """Where DeepSpeed caches its compiled ops when TORCH_EXTENSIONS_DIR is unset (as launch/train.sh)."""
    root = PACKAGE_DIR.parent
    if (root / ".venv").is_dir():  # a source checkout
        return root / ".cache" / "torch_extensions"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmsmall" / "torch_extensions"
