"""One optimizer step, when it does not log, makes one all-reduce and one device-to-host read in
the loop (loss sum, non-finite count, the next step's target tokens and the logged counts in one
tensor), whatever ``grad_accum``; and the model counts targets as the loop does (the check the
loop no longer makes on every micro-batch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_train import ROOT, _env, _losses, shards  # noqa: F401  (shards: the module's fixture)


@pytest.mark.slow
def test_a_step_that_does_not_log_makes_one_all_reduce_and_one_host_read(tmp_path, shards):  # noqa: F811
    out = tmp_path / "run"
    args = [
        "configs/train/tiny-pretrain.yaml",
        f"out_dir={out}",
        f"data.train=[{{path: {shards}}}]",
        "train.steps=5",
        "train.grad_accum=3",
        "train.log_every=4",
        "train.save_every=0",
        "train.tensorboard=false",
    ]
    worker = ROOT / "tests" / "sync_count_worker.py"
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "counts.json"), *args],
        cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "counts.json").read_text())
    assert result["code"] == 0
    per_step = {int(k): v for k, v in result["per_step"].items()}
    for step in (2, 3):  # neither logs (log_every 4) nor is the first (its target count) or last
        assert per_step[step] == {"all_reduce": 1, "host_read": 1}, per_step
    assert per_step[4]["all_reduce"] == 1  # logging adds no collective either
    assert sorted(_losses(out)) == [4, 5]


def test_model_counts_targets_as_the_loop_does(shards):  # noqa: F811
    from mmsmall.config import load_config
    from mmsmall.data.loader import TrainData, batch_counts
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.processor import Processor
    from mmsmall.processing.tokenizer import build_tokenizer

    cfg = load_config("configs/train/tiny-pretrain.yaml", [f"data.train=[{{path: {shards}}}]"])
    tok = build_tokenizer(cfg.model.tokenizer)
    model = VLM(cfg.model, tok).eval()
    data = TrainData(cfg, Processor(tok, cfg.model.image), tok.pad_token_id)
    with torch.no_grad():
        for _ in range(2):
            b = data.next_batch()
            batch = {k: v for k, v in b.items() if k != "sample_ids"}
            summed = model(**batch, loss_reduction="sum", keep_logits=False)
            mean = model(**batch, keep_logits=False)
            n = batch_counts(b)[0]  # the loop's count: the model's "mean" divides by the same
            assert n > 0 and float(summed.loss) / n == pytest.approx(float(mean.loss), rel=1e-5)
