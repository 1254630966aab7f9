"""End-to-end training with DeepSpeed on CPU: the real entry points on shards the test writes.

Runs are few and short (each DeepSpeed start costs seconds), so one test checks several things:
- ZeRO-2, one process: 20 steps lower the loss; a corrupt shard member is skipped and counted.
- Exact resume: 10 steps then kill -9 (after the step-10 checkpoint), resume, die inside the
  step-15 save, resume again, finish: per-step losses and sample ids equal the straight run's;
  the killed save left ``latest`` at step 10, which loaded.
- ZeRO-3, two processes through launch/train.sh, with activation checkpointing and a frozen
  tower: each rank holds half the parameters from construction on (zero.Init), the loss goes
  down, ranks read disjoint samples, the gathered model is saved; a second stage from that model
  (train.init_from, lr 0) saves exactly the weights it started from.
- A packed row gives the same per-sample logits as each sample run alone (no DeepSpeed).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from data_tools.shards import ShardWriter
from mmsmall.train.monitor import read_log

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def _image(i: int) -> tuple[bytes, str]:
    color = list(COLORS)[i % 4]
    shape = SHAPES[(i // 4) % 2]
    w, h = 60 + 13 * (i % 7), 50 + 11 * (i % 5)
    im = Image.new("RGB", (w, h), (245, 245, 245))
    d = ImageDraw.Draw(im)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue(), f"A {color} {shape} on a white background."


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    with ShardWriter(out, prefix="toy", max_count=12) as w:
        for i in range(48):
            img, caption = _image(i)
            if i == 7:
                img = img[: len(img) // 3]  # a truncated PNG: must be skipped and counted
            messages = [
                {"role": "user", "content": "Describe this image."},
                {"role": "assistant", "content": caption},
            ]
            meta = {"id": f"toy{i:03d}", "task": "caption", "messages": messages}
            if i % 3 == 0:  # several annotations of one image in one sequence
                q = [{"role": "user", "content": "What color is the shape?"}]
                q.append({"role": "assistant", "content": caption.split()[1]})
                meta["conversations"] = [messages, q]
            w.write(f"toy_{i:03d}", img, "png", meta)
    return out


def _env(nthreads: int = 1) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(nthreads))
    env["PYTHONPATH"] = str(ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train(
    out: Path, shards: Path, *overrides: str, steps: int = 20, check: bool = True, faults: dict | None = None
) -> subprocess.CompletedProcess:
    args = [
        "configs/train/tiny-pretrain.yaml",
        f"out_dir={out}",
        f"data.train=[{{path: {shards}}}]",
        f"train.steps={steps}",
        "train.save_every=5",
        "train.tensorboard=false",
        *overrides,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mmsmall.train", *args],
        cwd=ROOT,
        env=_env() | (faults or {}),  # mmsmall/faults.py: test-only fault injection
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _samples(out: Path, rank: int = 0) -> dict[int, list[str]]:
    per_step: dict[int, list[str]] = {}
    for line in (out / f"samples_rank{rank:05d}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] in per_step:  # a step re-run after a resume must consume the same samples
            assert per_step[rec["step"]] == rec["ids"], f"step {rec['step']} consumed different samples"
        per_step[rec["step"]] = rec["ids"]
    return per_step


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out / "log.jsonl")}


@pytest.mark.slow
def test_zero2_trains_resumes_exactly_and_survives_kill_in_save(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, shards)
    losses = _losses(straight)
    assert sorted(losses) == list(range(1, 21))
    assert sum(list(losses.values())[-3:]) / 3 < losses[1] - 0.5, losses
    last = read_log(straight / "log.jsonl")[-1]
    assert last["data/bad_image"] >= 1  # toy007 skipped, counted; training went on
    # the rank's peak memory (resident set on CPU), at least what a process with torch imported holds
    assert 0.2 < last["peak_mem_gib"] < 64 and last["n_targets"] > 0
    assert (straight / "loss.png").stat().st_size > 0 and (straight / "model" / "model.safetensors").exists()
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    kept = sorted(p.name for p in (straight / "checkpoints").glob("step_*"))
    assert kept == ["step_00000015", "step_00000020"]  # keep_last=2

    # 10 steps, then SIGKILL right after the step-10 checkpoint
    # (this segment encodes in 2 worker processes: same batches, and its position excludes read-ahead)
    p = _train(resumed, shards, "data.num_workers=2", check=False, faults={"MMSMALL_TEST_KILL_AT_STEP": "10"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    # resume; die inside the step-15 save (DeepSpeed files written, checkpoint unfinished)
    p = _train(
        resumed,
        shards,
        check=False,
        faults={"MMSMALL_TEST_KILL_AT_STEP": "15", "MMSMALL_TEST_KILL_DURING_SAVE": "1"},
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert (resumed / "checkpoints" / "step_00000015").exists()  # the half-written one
    # a resume that changes what training does is refused before DeepSpeed starts, in one line
    p = _train(resumed, shards, "train.lr.llm=0.05", check=False)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "train.lr.llm=0.05" in errors[0], p.stderr[-2000:]
    # latest deleted and the newest complete checkpoint damaged: resume from the newest verified one
    ckpts = resumed / "checkpoints"
    (ckpts / "latest").unlink()
    damaged = ckpts / "step_00000010" / "client_rank00000.pt"
    damaged.write_bytes(damaged.read_bytes()[:64])
    p = _train(resumed, shards)
    assert "step_00000010 skipped: client_rank00000.pt has 64 bytes" in p.stderr, p.stderr[-3000:]
    assert f"resumed from {ckpts / 'step_00000005'} (step 5)" in p.stderr
    assert (
        ckpts / "step_00000010.old1" / "client_rank00000.pt"
    ).stat().st_size == 64  # kept, not overwritten
    assert (ckpts / "step_00000015.old1").is_dir()  # the killed save's files too
    events = [json.loads(x) for x in (resumed / "log.jsonl").read_text().splitlines() if '"event"' in x]
    events = [e for e in events if e["event"] == "resume"]  # (each segment also ends with a "summary")
    assert [(e["step"], e["checkpoint"]) for e in events] == [(10, "step_00000010"), (5, "step_00000005")]
    assert _losses(resumed) == losses  # identical per-step losses (bit for bit through json)
    assert _samples(resumed) == _samples(straight)  # same samples, none repeated, none skipped


def _train_zero3(out: Path, shards: Path, *overrides: str, launcher: bool = True) -> str:
    """Two CPU ranks through launch/train.sh: its DeepSpeed launcher, or (``launcher=False``) two
    processes with RANK set, as torchrun / SLURM start them. Returns the (rank 0) output."""
    cmd = [
        "bash",
        str(ROOT / "launch" / "train.sh"),
        "configs/train/tiny-pretrain.yaml",
        f"out_dir={out}",
        f"data.train=[{{path: {shards}}}]",
        "train.deepspeed=configs/deepspeed/zero3.json",
        "train.grad_accum=1",
        "train.save_every=0",
        *overrides,
    ]
    if launcher:
        envs = [_env(1) | {"NPROC": "2"}]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            rendezvous = {
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(s.getsockname()[1]),
            }
        envs = [_env(1) | rendezvous | {"RANK": str(r), "LOCAL_RANK": str(r)} for r in range(2)]
    logs = [out.with_name(f"{out.name}.{r}.log") for r in range(len(envs))]  # files: no pipe to fill up
    files = [log.open("w") for log in logs]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=f, stderr=subprocess.STDOUT)
        for e, f in zip(envs, files)
    ]
    codes = [p.wait() for p in procs]
    for f in files:
        f.close()
    text = logs[0].read_text()
    assert codes == [0] * len(procs), text[-6000:]
    held = re.search(r"held after construction, per rank: \[(\d+), (\d+)\] of (\d+)", text)
    assert held, text[-3000:]
    *per_rank, total = map(int, held.groups())
    assert all(0.45 * total < n < 0.55 * total for n in per_rank), held.group(0)  # partitioned when built
    return text


@pytest.mark.slow
def test_zero3_two_processes_lower_the_loss(tmp_path, shards):
    out = tmp_path / "z3"
    overrides = ["train.activation_checkpointing=true", "train.freeze=[vision]"]
    err = _train_zero3(out, shards, "train.steps=8", *overrides)
    assert re.search(r"vision +frozen", err) and re.search(r"llm +trainable", err)
    assert list((out / "tensorboard").glob("events.*"))  # TensorBoard on by default
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 9))
    assert sum(losses[s] for s in (6, 7, 8)) / 3 < losses[1] - 0.3, losses
    r0, r1 = _samples(out, 0), _samples(out, 1)
    first_epoch = [i for s in sorted(r0) for i in r0[s]][:10], [i for s in sorted(r1) for i in r1[s]][:10]
    assert not set(first_epoch[0]) & set(first_epoch[1])  # each rank reads its own shards
    assert (out / "model" / "model.safetensors").exists()  # ZeRO-3 shards gathered for the save

    # a later stage from the trained model: loaded into the partitions, unchanged at lr 0, saved again
    lr0 = ["train.lr.connector=0", "train.lr.vision=0", "train.lr.llm=0", "train.tensorboard=false"]
    stage2 = [f"train.init_from={out / 'model'}", "train.steps=1", *lr0]
    _train_zero3(tmp_path / "stage2", shards, *stage2, launcher=False)
    start = load_file(out / "model" / "model.safetensors")
    end = load_file(tmp_path / "stage2" / "model" / "model.safetensors")
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)


def test_packed_row_matches_samples_run_alone(shards):
    from mmsmall.config import load_config
    from mmsmall.data.loader import TrainData
    from mmsmall.data.packing import collate_rows
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.processor import Processor
    from mmsmall.processing.tokenizer import build_tokenizer

    cfg = load_config("configs/train/tiny-pretrain.yaml", [f"data.train=[{{path: {shards}}}]"])
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model.tokenizer)
    model = VLM(cfg.model, tok).eval()
    data = TrainData(cfg, Processor(tok, cfg.model.image), tok.pad_token_id)
    pulled = [data._pull() for _ in range(12)]
    multi = next(e for e in pulled if int(e["conv_ids"].max()) == 2)  # two conversations on one image
    examples = [e for e in pulled if e is not multi][:2] + [multi]
    with torch.no_grad():
        packed = collate_rows(
            [examples], tok.pad_token_id, seq_len=sum(len(e["input_ids"]) for e in examples) + 5
        )
        logits = model(**packed).logits[0]  # (T, V)
        t = 0
        for e in examples:
            alone = model(**collate_rows([[e]], tok.pad_token_id)).logits[0]  # (L, V)
            L = alone.shape[0]
            torch.testing.assert_close(logits[t : t + L], alone, atol=1e-4, rtol=1e-4)
            t += L
