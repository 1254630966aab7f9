"""Text-only micro-batches still run the vision tower and connector (zero-weighted), so ZeRO-3
gathers the same parameters in the same order on every rank.

- Unit: a text-only batch in training runs the tower once on a blank crop; the loss and every
  LLM gradient equal those of the pass without it (eval-mode forward, which skips it), and the
  tower's and connector's gradients are exactly zero.
- ZeRO-3, 2 processes (``mixed_modality_worker.py``): rank 0 gets image micro-batches, rank 1
  only text-only ones; the run finishes inside a timeout and its per-step losses equal a
  single-process reference that trains on both ranks' micro-batches by gradient accumulation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmsmall.config import ModelConfig, load_config
from mmsmall.model.vlm import VLM
from mmsmall.processing.processor import Processor, collate
from mmsmall.processing.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("mixed_modality_worker.py")


def test_text_only_batch_runs_the_tower_zero_weighted_loss_and_grads_unchanged():
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    tok = build_tokenizer(cfg.tokenizer, cfg.llm.name)
    torch.manual_seed(0)
    model = VLM(cfg, tok)
    conv = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}]
    batch = collate([Processor(tok, cfg.image).encode(None, [conv], sample_id="t")], tok.pad_token_id)
    assert batch["pixel_values"] is None
    runs = {}
    for training in (False, True):
        model.zero_grad(set_to_none=True)
        model.train(training)
        calls: list[int] = []
        hook = model.vision.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        loss = model(**batch).loss
        loss.backward()
        hook.remove()
        runs[training] = (len(calls), loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (calls_eval, loss_eval, g_eval), (calls_train, loss_train, g_train) = runs[False], runs[True]
    assert (calls_eval, calls_train) == (0, 1)
    assert torch.equal(loss_train, loss_eval)
    # every parameter an image batch trains took part: the same ZeRO-3 gathers on every rank
    model.zero_grad(set_to_none=True)
    image = Image.new("RGB", (90, 60), (200, 30, 30))
    with_image = Processor(tok, cfg.image).encode(image, [conv], sample_id="i")
    model(**collate([with_image], tok.pad_token_id)).loss.backward()
    used = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {n for n, g in g_train.items() if g is not None} == used
    assert any(n.startswith("vision.") for n in used) and any(n.startswith("connector.") for n in used)
    for name in used:
        g = g_train[name]
        if name.startswith(("vision.", "connector.")):
            assert g_eval[name] is None and not g.any(), name
        else:
            torch.testing.assert_close(g, g_eval[name], rtol=0, atol=0, msg=name)


def _run(world: int, out: Path) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env |= {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out)],
            cwd=ROOT,
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(
            f"world {world}: hung (no finish in 240 s): ranks gathered out of order"
        ) from None
    assert [p.returncode for p in procs] == [0] * world, outputs[0][-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_zero3_rank_with_only_text_batches_finishes_with_reference_losses(tmp_path):
    distributed = _run(2, tmp_path / "zero3.json")
    reference = _run(1, tmp_path / "reference.json")
    assert len(distributed) == len(reference) == 3
    assert distributed[-1] < distributed[0]
    torch.testing.assert_close(torch.tensor(distributed), torch.tensor(reference), rtol=1e-4, atol=1e-4)
