"""Export from a two-process ZeRO-3 checkpoint equals export from the same weights under ZeRO-2.

One short 2-process ZeRO-3 run through launch/train.sh (tiny SigLIP + OLMo-2, 2 steps); its
checkpoint is consolidated and re-saved by a one-process ZeRO-2 engine; both checkpoints are
exported (stock Molmo2 format) and must hold bit-identical tensors and the same config.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_train import _env  # subprocess env: CPU DeepSpeed, offline, no inherited rank

from data_tools.shards import ShardWriter

ROOT = Path(__file__).resolve().parent.parent

# Re-save the weights of a ZeRO-3 checkpoint through a one-process ZeRO-2 engine (DeepSpeed's
# process group stays inside this subprocess).
_RESAVE_ZERO2 = """
import sys
from mmsmall.config import load_config, RunConfig
from mmsmall.export.consolidate import consolidate_deepspeed
from mmsmall.model.vlm import VLM
from mmsmall.processing.tokenizer import build_tokenizer
from mmsmall.train import checkpoint
from mmsmall.train.engine import build_engine, init_distributed

src, dst = sys.argv[1], sys.argv[2]
cfg = load_config(src + "/config.yaml", ["train.deepspeed=configs/deepspeed/zero2.json"], cls=RunConfig)
_, world = init_distributed()
vlm = VLM(cfg.model, build_tokenizer(cfg.model.tokenizer, cfg.model.llm.name))
vlm.load_state_dict(consolidate_deepspeed(src), strict=True)
engine = build_engine(cfg, vlm, world)
checkpoint.save(engine, dst, 1, {}, cfg)
"""


def _shards(out: Path) -> Path:
    with ShardWriter(out, prefix="toy", max_count=4) as w:
        for i in range(8):
            im = Image.new("RGB", (60 + 9 * i, 50 + 7 * i), (245, 245, 245))
            ImageDraw.Draw(im).rectangle((10, 10, 40, 30), fill=(200, 30 * i, 40))
            buf = io.BytesIO()
            im.save(buf, "PNG")
            msgs = [
                {"role": "user", "content": "Describe this image."},
                {"role": "assistant", "content": f"A red square number {i}."},
            ]
            w.write(
                f"toy_{i:03d}", buf.getvalue(), "png", {"id": f"toy{i}", "task": "caption", "messages": msgs}
            )
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_zero3_two_process_export_equals_zero2(tmp_path):
    from mmsmall.export import run_export

    shards = _shards(tmp_path / "shards")
    run = tmp_path / "run"
    cmd = [
        "bash",
        str(ROOT / "launch" / "train.sh"),
        "configs/train/tiny-pretrain.yaml",
        "model=configs/model/tiny-molmo2.yaml",
        f"out_dir={run}",
        f"data.train=[{{path: {shards}}}]",
        "data.seq_len=256",
        "train.deepspeed=configs/deepspeed/zero3.json",
        "train.steps=2",
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        "train.save_every=0",
        "train.tensorboard=false",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env() | {"NPROC": "2"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    z3_ckpt = run / "checkpoints" / tag
    assert len(list(z3_ckpt.glob("*_optim_states.pt"))) == 2  # really two ZeRO-3 partitions

    z2_root = tmp_path / "z2" / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", _RESAVE_ZERO2, str(z3_ckpt), str(z2_root)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    (run / "eval").mkdir()
    results = {
        "convention": "lmms-eval",
        "tasks": {"chartqa": {"primary": "relaxed_accuracy", "score": 12.5, "n": 8}},
    }
    (run / "eval" / "results.json").write_text(json.dumps(results))
    a = run_export(str(run), str(tmp_path / "from_zero3"), fmt="molmo2")  # the run folder -> latest
    card = (a / "README.md").read_text()
    assert "| chartqa | relaxed_accuracy | 12.50 | 8 |" in card  # the run's eval results, found by itself
    assert "stage3" in card or "zero3" in card  # the training configuration is in the card
    b = run_export(str(tmp_path / "z2"), str(tmp_path / "from_zero2"), fmt="molmo2")
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 50
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    # and the export holds the trained weights, not the initial ones: the run's own final save agrees
    from mmsmall.export import load_molmo2
    from mmsmall.export.load import load_model

    final = load_model(run / "model")
    back = load_molmo2(a)
    # every parameter: the final save gathers ZeRO-3 shards one parameter at a time
    named = dict(final.named_parameters())
    assert len(named) > 50
    for name, p in named.items():
        assert torch.equal(back.get_parameter(name), p), name
