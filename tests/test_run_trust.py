"""A run does what its config says and reports what happened, from the user's side (issue 22):

- launch/train.sh refuses a bad run in one line, exit 2, before the DeepSpeed launcher starts
  (config errors, an out_dir that is a file, an init_from of the wrong kind, a later stage's
  shape-changing ``model.*`` key);
- a run owns its out_dir: a second run into it is refused with the first's pid and host (by the
  launcher's check, and by rank 0's lock when started without it), the first finishes intact; a
  restart after a killed run takes the lock over;
- a later stage (``train.init_from``) trains with its own crop count, and a resume may not change it;
- data counts (dropped conversations, their answer tokens, repeated samples) are summed over
  data workers and ranks into log.jsonl, TensorBoard and the summary; a resume on fewer
  processes names the global batch change and the grad_accum that keeps it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_train import ROOT, _env, shards  # noqa: F401  (shards: the module's fixture)

from data_tools.shards import ShardWriter
from mmsmall.train.monitor import read_log

TINY = "configs/train/tiny-pretrain.yaml"


def _launch_env(**extra: str) -> dict:
    return _env(1) | {"PYTHON": sys.executable, **extra}


def _args(out: Path, data: Path, *overrides: str) -> list[str]:
    return [TINY, f"out_dir={out}", f"data.train=[{{path: {data}}}]", "train.tensorboard=false", *overrides]


def _sh(out: Path, data: Path, *overrides: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = ["bash", str(ROOT / "launch" / "train.sh"), *_args(out, data, *overrides)]
    return subprocess.run(
        cmd, cwd=ROOT, env=env or _launch_env(), capture_output=True, text=True, timeout=600, **kw
    )


def _errors(p: subprocess.CompletedProcess) -> list[str]:
    return [x for x in p.stderr.splitlines() if x.startswith("error:")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny model (what a stage-1 run leaves in out_dir/model), made without training."""
    from mmsmall.config import load_config
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer

    cfg = load_config(ROOT / TINY).model
    folder = tmp_path_factory.mktemp("stage1") / "model"
    VLM(cfg, build_tokenizer(cfg.tokenizer, cfg.llm.name)).save_pretrained(folder)
    return folder


def test_bad_runs_are_refused_in_one_line_before_the_launcher_starts(tmp_path, shards, model_dir):  # noqa: F811
    run_folder = tmp_path / "stage1_run"  # a run's folder, not its model
    (run_folder / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_folder / "config.yaml").write_text("name: stage1\n")
    ckpt = run_folder / "checkpoints" / "step_00000002"
    (ckpt / "complete.json").write_text('{"world_size": 1}')
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {
        "train.steps=0": "train.steps: 0 is below",
        "train.micro_batch_size=0": "train.micro_batch_size: 0 is below",
        "train.stpes=3": "unknown config key train.stpes; valid keys under train:",
        "data.response_dropout=1.0": "data.response_dropout: 1.0; valid range [0, 1)",
        f"out_dir={a_file}": "is a file",
        f"train.init_from={run_folder}": f"is a training run folder; give its saved model: train.init_from={run_folder / 'model'}",
        f"train.init_from={ckpt}": "is a DeepSpeed checkpoint; export it first",
        f"train.init_from={shards}": "holds neither model_config.yaml + model.safetensors nor a Molmo2 release",
        f"train.init_from={model_dir} model.connector.mlp_hidden=7": "model.connector.mlp_hidden=7 (the folder's: ",
    }
    out = tmp_path / "never_made"
    for override, expected in cases.items():
        p = _sh(out, shards, *override.split(" "))
        assert p.returncode == 2 and len(_errors(p)) == 1, (override, p.stderr[-2000:])
        assert expected in _errors(p)[0], (override, _errors(p))
        assert "sigkill_handler" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert not out.exists()  # refused before anything was written


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_second_run_into_a_busy_out_dir_is_refused_and_the_first_finishes_intact(tmp_path, shards):  # noqa: F811
    out, go = tmp_path / "run", tmp_path / "go"  # the first run waits after step 1 until `go` exists
    log_a = (tmp_path / "a.log").open("w")
    first = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "train.sh"), *_args(out, shards, "train.steps=6", "train.save_every=3")],
        cwd=ROOT, env=_launch_env(MMSMALL_TEST_HOLD=f"1:{go}"), stdout=log_a, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_for(
            lambda: (out / "log.jsonl").is_file() and (out / "log.jsonl").stat().st_size, first, "step 1"
        )
        holder = json.loads((out / "run.lock").read_text())
        assert holder["host"] == socket.gethostname()
        second = ["train.steps=4", "train.lr.llm=0.05", "seed=7"]  # another run's config
        # launch/train.sh: refused by its check, before the DeepSpeed launcher starts
        p = _sh(out, shards, *second)
        (error,) = _errors(p)
        assert p.returncode == 2 and f"pid {holder['pid']} on host {holder['host']}" in error, p.stderr[
            -2000:
        ]
        assert "sigkill_handler" not in p.stderr
        # python -m mmsmall.train (no launcher check): refused by rank 0's lock, before it writes anything
        cmd = [sys.executable, "-m", "mmsmall.train", *_args(out, shards, *second)]
        p = subprocess.run(cmd, cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and f"pid {holder['pid']} on host" in "".join(_errors(p)), p.stderr[-2000:]
        assert not list(out.glob("*.old*"))  # the refused runs set nothing of the first one's aside
        go.touch()
        assert first.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-4000:]
    finally:
        if first.poll() is None:
            first.kill()
        log_a.close()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 0 and saved["train"]["steps"] == 6  # the first run's, not the refused one's
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "event" not in r] == list(range(1, 7))  # each step once, one run
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (out / "model" / "model.safetensors").is_file()


def _picture(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48 + 8 * i, 40), [(200, 40, 40), (40, 200, 40), (40, 40, 200)][i % 3]).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_a_later_stage_trains_with_its_own_crops_and_a_restart_takes_the_lock_over(
    tmp_path,
    shards,  # noqa: F811
    model_dir,
):
    out = tmp_path / "stage2"
    stage2 = [
        f"train.init_from={model_dir}",
        "model.image.max_crops=2",
        "train.steps=2",
        "train.save_every=1",
    ]
    killed = _sh(out, shards, *stage2, env=_launch_env(MMSMALL_TEST_KILL_AT_STEP="1"))
    assert killed.returncode != 0 and "killing rank 0 after step 1" in killed.stderr, killed.stderr[-3000:]
    dead = json.loads((out / "run.lock").read_text())["pid"]
    # the processing setting of the new stage took effect (the folder's model has 4 crops)
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["image"]["max_crops"] == 2
    # a resume may not change it: it changes what the run learns from
    changed = [*stage2[:1], "model.image.max_crops=3", *stage2[2:]]
    p = subprocess.run(
        [sys.executable, "-m", "mmsmall.train", *_args(out, shards, *changed)],
        cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2 and "model.image.max_crops=3 (checkpoint: 2)" in "".join(_errors(p)), p.stderr[
        -2000:
    ]
    assert "out_dir: taking over" in p.stderr and f"'pid': {dead}" in p.stderr  # the killed run's lock
    p = _sh(out, shards, *stage2)
    assert p.returncode == 0 and "out_dir: taking over" in p.stderr, p.stderr[-3000:]
    assert json.loads((out / "run.lock").read_text())["pid"] != dead
    assert yaml.safe_load((out / "model" / "model_config.yaml").read_text())["image"]["max_crops"] == 2
    assert yaml.safe_load((model_dir / "model_config.yaml").read_text())["image"]["max_crops"] == 4


@pytest.mark.slow
def test_data_counts_are_summed_over_workers_and_ranks_and_a_smaller_resume_names_the_batch(tmp_path):
    data = tmp_path / "small"  # 2 shards of 3 images; every sample's second conversation never fits
    long_answer = " ".join(["the shape is drawn in a bright colour on a plain background"] * 40)
    with ShardWriter(data, prefix="s", max_count=3) as w:
        for i in range(6):
            short = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}]
            long = [
                {"role": "user", "content": "Describe it."},
                {"role": "assistant", "content": long_answer},
            ]
            w.write(f"s_{i:03d}", _picture(i), "png", {"id": f"s{i}", "conversations": [short, long]})
    out = tmp_path / "run"
    common = ["train.grad_accum=1", "train.micro_batch_size=2", "data.num_workers=1", "train.save_every=3"]
    p = _sh(out, data, "train.steps=3", "train.tensorboard=true", *common, env=_launch_env(NPROC="2"))
    assert p.returncode == 0, p.stderr[-4000:]
    steps = read_log(out / "log.jsonl")
    last = steps[-1]
    consumed = sum(r["samples"] for r in steps)  # every rank's samples, summed
    # each drawn sample lost its second conversation: every one consumed (both ranks, drawn in
    # worker processes) is counted, plus at most the examples the packers still hold
    assert consumed <= last["data/dropped_conversations"] <= consumed + 2 * 8 * 2, (consumed, last)
    assert last["data/truncated_targets"] >= 40 * last["data/dropped_conversations"]
    assert last["data/repeated_samples"] > 0 and "samples came twice inside one step" in p.stderr
    (summary,) = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"summary"' in x]
    assert summary["data/dropped_conversations"] == last["data/dropped_conversations"]
    assert "dropped_conversations" in p.stderr.split("data at step 3:")[1].splitlines()[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert tb.Scalars("data/dropped_conversations")[-1].value == last["data/dropped_conversations"]
    # the same run resumed on one process: the global batch halves, and the warning names the fix
    p = _sh(out, data, "train.steps=4", *common, env=_launch_env(NPROC="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    assert "global batch changes from 4 to 2" in p.stderr and "train.grad_accum=2 keeps it" in p.stderr
    resumed = read_log(out / "log.jsonl")[-1]
    for key in (
        "data/dropped_conversations",
        "data/repeated_samples",
    ):  # the counts go on from the checkpoint's
        assert resumed[key] > last[key], (key, resumed[key], last[key])


def test_a_killed_run_leaves_a_lock_any_restart_takes(tmp_path):
    """The lock itself: held while its process lives, free the moment it is killed."""
    from mmsmall.config import ConfigError
    from mmsmall.train.runlock import RunLock, probe

    holder = subprocess.Popen(
        [sys.executable, "-c", f"from mmsmall.train.runlock import RunLock; l = RunLock({str(tmp_path)!r}); "
         "print('held', flush=True); import time; time.sleep(60)"],
        cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            probe(tmp_path)
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            RunLock(tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)  # the killed holder's lock is free: taken over, its record kept for the log
    assert lock.previous["pid"] == holder.pid
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
