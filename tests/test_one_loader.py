"""One loader: every entry point loads every model folder kind through ``export/load.load_model``.

The folder kinds are real: a ``VLM.save_pretrained`` folder, a training run (its ``model/`` and
its DeepSpeed checkpoint, from one real 2-step ``mmsmall.train`` run), our HF export
(``run_export``), and a stock transformers Molmo2 folder (built as test_import_molmo2 builds it).
The entry points are the ones users reach: training's ``build_model`` (``train.init_from``),
export's ``run_export``, eval's ``load_predictor`` (``mmsmall eval --model``), chat / predict's
Predictor, ``plan``'s model shape and transformers' Auto class. ``LOADS``, the loader's own count
of its calls by source kind, shows each went through it. Loading a folder enters no module of
mmsmall twice: a profiler follows the call stack and finds no module re-entered above itself.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_import_molmo2 import build_stock_molmo2
from test_train import ROOT, _env, shards  # noqa: F401 - the module's shard fixture

from mmsmall.export.load import LOADS, load_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shards) -> dict[str, Path]:  # noqa: F811
    """One folder of each kind: (kind the loader classifies it as, path)."""
    from mmsmall.export.release import run_export

    root = tmp_path_factory.mktemp("kinds")
    run = root / "run"
    args = ["configs/train/tiny-pretrain.yaml", f"out_dir={run}", f"data.train=[{{path: {shards}}}]"]
    args += ["train.steps=2", "train.save_every=2", "train.tensorboard=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "mmsmall.train", *args], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_export(run, root / "hf")
    return {
        "saved model (a run's model/)": ("vlm", run / "model"),
        "training run": ("deepspeed", run),
        "DeepSpeed checkpoint": ("deepspeed", run / "checkpoints" / "step_00000002"),
        "our HF export": ("hf", root / "hf"),
        "stock Molmo2": ("molmo2", build_stock_molmo2(root / "molmo2")),
    }


def _through_loader(kind: str, entry) -> object:
    before = LOADS[kind]
    out = entry()
    assert LOADS[kind] == before + 1, f"{entry} did not load a {kind} folder through load_model"
    return out


def _entry_points(kind: str, path: Path, tmp: Path) -> dict:
    from eval.runner import load_predictor
    from mmsmall.config import RunConfig, load_config
    from mmsmall.export.release import run_export
    from mmsmall.inference.chat import _predictor
    from mmsmall.train.zero_init import build_model

    run_cfg = load_config("configs/train/tiny-finetune.yaml", [f"train.init_from={path}"], cls=RunConfig)
    return {
        "train.init_from": lambda: build_model(run_cfg, 1).model,
        # a model prompted in its own chat template is released in Molmo2's format
        "mmsmall export": lambda: run_export(
            path, tmp / "export", fmt="molmo2" if kind == "molmo2" else "mmsmall"
        ),
        "mmsmall eval --model": lambda: load_predictor(path, device="cpu").model,
        "mmsmall chat / predict": lambda: _predictor(str(path)).model,
    }


@pytest.mark.parametrize(
    "name",
    ["saved model (a run's model/)", "training run", "DeepSpeed checkpoint", "our HF export", "stock Molmo2"],
)
def test_every_entry_point_loads_the_kind_through_the_one_loader(folders, name, tmp_path):
    kind, path = folders[name]
    models = {}
    for entry, load in _entry_points(kind, path, tmp_path).items():
        models[entry] = _through_loader(kind, load)
    # the same weights whichever way in (the export wrote a folder: read it back the one way)
    ref = load_model(path).state_dict()
    trained = models["train.init_from"].state_dict()
    assert all(torch.equal(trained[k], v) for k, v in ref.items())


def test_hf_class_and_plan_build_through_the_one_loader(folders, tmp_path):
    from transformers import AutoModelForImageTextToText

    import mmsmall.export.hf  # noqa: F401  (registers model_type "mmsmall" with the Auto classes)
    from mmsmall.config import RunConfig, load_config
    from mmsmall.train.plan import model_shape

    _, hf = folders["our HF export"]
    model = _through_loader("config", lambda: AutoModelForImageTextToText.from_pretrained(hf))
    ref = load_model(hf).state_dict()
    assert all(torch.equal(model.vlm.state_dict()[k], v) for k, v in ref.items())
    cfg = load_config("configs/train/tiny-pretrain.yaml", cls=RunConfig)
    assert _through_loader("config", lambda: model_shape(cfg)).params["llm"] > 0


def _reentered(fn) -> list[str]:
    """Run ``fn`` under a profiler; the mmsmall modules it entered while already further down the
    call stack (A -> B -> A)."""
    stack: list[str] = []
    found: list[str] = []

    def profile(frame, event, arg):
        if event == "call":
            mod = frame.f_globals.get("__name__", "")
            ours = [m for m in stack if m.startswith("mmsmall")]
            if mod.startswith("mmsmall") and mod in ours and ours[-1] != mod:
                found.append(f"{' -> '.join(dict.fromkeys(ours))} -> {mod}")
            stack.append(mod)
        elif event == "return" and stack:
            stack.pop()

    threading.setprofile(None)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return found


@pytest.mark.parametrize(
    "name", ["saved model (a run's model/)", "DeepSpeed checkpoint", "our HF export", "stock Molmo2"]
)
def test_loading_a_folder_enters_no_module_twice(folders, name):
    _, path = folders[name]
    assert _reentered(lambda: load_model(path)) == []
