"""The 7B paths on CPU: every DeepSpeed config in configs/deepspeed/ trains on 2 processes, bf16.

Each case is one short 2-process run through launch/train.sh (the DeepSpeed launcher) on the
shards of tests/test_train.py:
- ``zero2.json`` in bf16: the loss falls; the run's checkpoint goes through ``mmsmall export``
  and the exported folder loads with ``AutoModelForImageTextToText`` and predicts the same
  tokens as the trained model the run saved.
- ``zero2_offload.json`` / ``zero3_offload.json``: optimizer states on the CPU need DeepSpeed's
  CPU Adam, which the DeepSpeed config builds (``engine.build_optimizer``) over mmsmall's
  per-module groups: the log names ``DeepSpeedCPUAdam`` and each module's own learning rate.
``zero3.json`` on 2 processes is ``test_train.py::test_zero3_two_processes_lower_the_loss``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import ROOT, _env, _losses, shards  # noqa: F401  (shards: the module's fixture)

from mmsmall.train.monitor import read_log

EXE = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"


def _launch(out: Path, data: Path, *overrides: str, steps: int = 6) -> str:
    cmd = [
        "bash",
        str(ROOT / "launch" / "train.sh"),
        "configs/train/tiny-pretrain.yaml",
        f"out_dir={out}",
        f"data.train=[{{path: {data}}}]",
        f"train.steps={steps}",
        "train.grad_accum=1",
        f"train.save_every={steps}",
        "train.tensorboard=false",
        *overrides,
    ]
    log = out.with_name(out.name + ".log")
    with log.open("w") as f:
        code = subprocess.run(
            cmd, cwd=ROOT, env=_env(1) | {"NPROC": "2"}, stdout=f, stderr=subprocess.STDOUT, timeout=600
        ).returncode
    text = log.read_text()
    assert code == 0, text[-6000:]
    return text


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.json", "zero2_offload.json", "zero3_offload.json"])
def test_each_deepspeed_config_trains_on_two_processes(tmp_path, shards, config):  # noqa: F811
    out = tmp_path / "run"
    bf16 = config == "zero2.json"
    extra = ["train.precision=bf16"] if bf16 else []
    text = _launch(out, shards, f"train.deepspeed=configs/deepspeed/{config}", *extra)
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1] - 0.2, losses
    first = read_log(out / "log.jsonl")[0]
    lrs = {k: v for k, v in first.items() if k.startswith("lr/")}
    assert len(set(lrs.values())) == 3, lrs  # connector, vision, llm: each its own warm-up and peak
    if "offload" in config:
        assert "optimizer DeepSpeedCPUAdam (from the DeepSpeed config)" in text, text[-3000:]
        return
    assert "optimizer AdamW (from mmsmall)" in text
    # bf16: the checkpoint exports through the CLI, and the release loads with stock transformers
    release = tmp_path / "release"
    proc = subprocess.run(
        [EXE, "export", str(out), str(release)], cwd=ROOT, env=_env(1), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import torch
    from transformers import AutoModelForImageTextToText

    import mmsmall.export.hf  # noqa: F401  (registers model_type "mmsmall" with the Auto classes)
    from mmsmall.export.load import load_model

    exported = AutoModelForImageTextToText.from_pretrained(release)
    trained = load_model(out / "model")
    ids = torch.tensor([[5, 9, 17, 33, 2, 7]])
    with torch.no_grad():
        got = exported(input_ids=ids).logits
        want = trained(input_ids=ids).logits
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # bf16 weights on both sides


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory) -> Path:
    """32 good samples in 4 shards of 8: each of 2 ranks reads 16 of them per epoch."""
    from test_train import _image

    from data_tools.shards import ShardWriter

    out = tmp_path_factory.mktemp("even")
    with ShardWriter(out, prefix="even", max_count=8) as w:
        for i in range(32):
            img, caption = _image(i)
            msgs = [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": caption}]
            w.write(f"even_{i:03d}", img, "png", {"id": f"e{i:02d}", "task": "caption", "messages": msgs})
    return out


def _ids(out: Path) -> list[str]:
    return [i for f in sorted(out.glob("samples_rank*.jsonl")) for line in f.read_text().splitlines()
            for i in json.loads(line)["ids"]]  # fmt: skip


@pytest.mark.slow
def test_saved_on_two_processes_resumes_on_one(tmp_path, even_shards):
    """3 steps on 2 processes (grad_accum 1), then 5 more on 1 (grad_accum 2: the same global
    batch): DeepSpeed's universal checkpoint carries weights and optimizer, the data position of
    both old ranks continues on the one, so the 32 samples consumed (unpacked: 4 a step) equal
    those of an uninterrupted 1-process run of 8 steps: the epoch, each sample once."""
    common = [f"data.train=[{{path: {even_shards}}}]", "data.pack=false", "train.tensorboard=false"]
    out, ref = tmp_path / "elastic", tmp_path / "ref"
    _launch(out, even_shards, "data.pack=false", steps=3)
    assert (
        json.loads((out / "checkpoints" / "step_00000003" / "complete.json").read_text())["world_size"] == 2
    )
    one = [
        "configs/train/tiny-pretrain.yaml",
        f"out_dir={out}",
        *common,
        "train.steps=8",
        "train.grad_accum=2",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mmsmall.train", *one], cwd=ROOT, env=_env(1), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed a 2-rank checkpoint on 1 ranks" in proc.stderr, proc.stderr[-3000:]
    assert not list((out / "checkpoints").glob("*.universal"))  # the conversion is not kept
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1], losses
    straight = ["configs/train/tiny-pretrain.yaml", f"out_dir={ref}", *common, "train.steps=8"]
    proc = subprocess.run(
        [sys.executable, "-m", "mmsmall.train", *straight, "train.save_every=0"],
        cwd=ROOT, env=_env(1), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got, want = _ids(out), _ids(ref)
    assert len(got) == 32 and sorted(got) == sorted(want) == sorted(set(want)), (got, want)
