"""Evaluation during training (train.eval), through the real entry points, in one short run:

- the in-training scores and answers at a step equal what `mmsmall eval` gives on the checkpoint
  saved at that step (same answers per sample, same scores);
- the scores land in eval.jsonl, TensorBoard and a wandb run logged offline (WANDB_MODE=offline)
  together with the loss, and loss.png draws them;
- training with evaluation gives the same losses as training without it (its own random state).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.synth import generate
from data_tools.synth.scenes import EASY_COUNT
from mmsmall.train.monitor import read_log

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("synth_scenes_count", "synth_scenes_point")


def _env(tmp: Path) -> dict:
    from test_train import _env as train_env

    return train_env() | {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true"}


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _wandb_history(path: Path) -> dict[int, dict]:
    """step -> logged values, read from an offline run's ``.wandb`` file: wandb's records are
    protobufs in a LevelDB-style log (a 7-byte file header, 32 KiB blocks of chunks that each
    start with crc32, length, type; types 1/4 end a record)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, steps = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a chunk header
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0 and n == 0:
            break
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                steps.setdefault(rec.history.step.num, {}).update(items)
    return steps


def _answers(folder: Path, task: str) -> dict[str, str]:
    lines = (folder / "predictions" / f"{task}.jsonl").read_text().splitlines()
    return {e["id"]: e["response"] for e in map(json.loads, lines)}


@pytest.mark.slow
def test_in_training_eval_equals_mmsmall_eval_of_the_checkpoint_and_logs_to_wandb(tmp_path):
    pytest.importorskip("wandb")
    scenes = {**EASY_COUNT, "question_types": ["count", "point"]}
    generate("scenes", n=32, seed=0, out=tmp_path / "train", split="train", shard_size=100, **scenes)
    generate("scenes", n=12, seed=0, out=tmp_path / "heldout", split="eval", shard_size=100, **scenes)
    env = _env(tmp_path)
    tasks = "{" + ", ".join(f"{t}: {tmp_path / 'heldout'}" for t in TASKS) + "}"
    base = [sys.executable, "-m", "mmsmall.train", "configs/train/tiny-pretrain.yaml",
            f"data.train=[{{path: {tmp_path / 'train'}}}]", "train.steps=6", "train.save_every=3",
            "train.keep_last=2", "train.lr.llm=3e-3"]  # fmt: skip
    run = tmp_path / "run"
    _run([*base, f"out_dir={run}", "train.eval.every=3", "train.eval.limit=8",
          f"train.eval.tasks={tasks}", "train.wandb=true"], env)  # fmt: skip
    plain = tmp_path / "plain"
    _run([*base, f"out_dir={plain}", "train.tensorboard=false"], env)

    evals = read_log(run / "eval.jsonl")
    assert [r["step"] for r in evals] == [3, 6]
    for step in (3, 6):
        tag = f"step_{step:08d}"
        out = tmp_path / f"eval_{step}"
        data = [a for t in TASKS for a in ("--data", f"{t}={tmp_path / 'heldout'}")]
        exe = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"
        _run([exe, "eval", "--model", str(run / "checkpoints" / tag), "--tasks", ",".join(TASKS),
              "--out", str(out), "--limit", "8", "--num-workers", "0", *data], env)  # fmt: skip
        offline = json.loads((out / "results.json").read_text())["tasks"]
        live = json.loads((run / "eval" / tag / "results.json").read_text())["tasks"]
        rec = next(r for r in evals if r["step"] == step)
        for t in TASKS:
            assert _answers(out, t) == _answers(run / "eval" / tag, t)  # the same answer to every sample
            assert live[t]["metrics"] == offline[t]["metrics"]
            assert rec[f"eval/{t}"] == pytest.approx(offline[t]["score"])
    # evaluation does not disturb training: the same losses as the run without it
    assert [r["loss"] for r in read_log(run / "log.jsonl")] == [
        r["loss"] for r in read_log(plain / "log.jsonl")
    ]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    assert {"loss", *(f"eval/{t}" for t in TASKS)} <= set(tb.Tags()["scalars"])
    assert [e.step for e in tb.Scalars(f"eval/{TASKS[0]}")] == [3, 6]

    (wandb_file,) = (tmp_path / "wandb").glob("offline-run-*/*.wandb")
    history = _wandb_history(wandb_file)
    assert sorted(history) == list(range(1, 7))
    assert [history[s]["loss"] for s in range(1, 7)] == pytest.approx(
        [r["loss"] for r in read_log(run / "log.jsonl")]
    )
    for rec in evals:
        for t in TASKS:
            assert history[rec["step"]][f"eval/{t}"] == pytest.approx(rec[f"eval/{t}"])
    assert (run / "loss.png").stat().st_size > 0

    # the in-training model is keyed by its weights: step 3's and step 6's answers never share a key
    weights = {step: _weights(run / "eval" / f"step_{step:08d}") for step in (3, 6)}
    assert weights[3] != weights[6] and "Predictor" not in {*weights[3], *weights[6]}
    # a fresh run into the same out_dir (its checkpoints gone) with other weights: the earlier run's
    # eval answers, scores and log are set aside, never reused or mixed in
    shutil.rmtree(run / "checkpoints")
    _run([*base, f"out_dir={run}", "train.steps=3", "train.lr.llm=1e-3", "train.eval.every=3",
          "train.eval.limit=8", f"train.eval.tasks={tasks}"], env)  # fmt: skip
    assert (run / "eval.old1" / "step_00000003").is_dir() and (run / "log.jsonl.old1").is_file()
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [1, 2, 3]  # no step of the earlier run
    assert [r["step"] for r in read_log(run / "eval.jsonl")] == [3]
    assert _weights(run / "eval" / "step_00000003") != weights[3]


def _weights(folder: Path) -> set[str]:
    """The model keys (``weights``) of an eval folder's cached predictions."""
    return {
        json.loads(line)["weights"]
        for t in TASKS
        for line in (folder / "predictions" / f"{t}.jsonl").read_text().splitlines()
    }


def test_loss_curve_is_smoothed_like_tensorboard(tmp_path):
    """TensorBoard's smoothing: a debiased exponential moving average (starts at the first value,
    a constant stays constant); loss.png draws it over the faint raw values, with the eval panel."""
    from mmsmall.train.monitor import plot_loss, smooth

    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    s = smooth([1.0] * 5 + [3.0] * 5, weight=0.5)
    assert s[0] == 1.0 and s[4] == pytest.approx(1.0) and 1.0 < s[5] < s[9] < 3.0
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 30)))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"step": 10, "eval/synth_charts": 40.0}) + "\n")
    plot_loss(log, tmp_path / "loss.png", tmp_path / "eval.jsonl")
    from PIL import Image

    assert Image.open(tmp_path / "loss.png").width > 1000  # two panels side by side
