"""State is owned, not hidden: distributed set-up says what it sets, the Predictor leaves the
caller's model as it was, and a shard reader's warn-once memory belongs to the reader."""

from __future__ import annotations

import logging
import os

import torch
from test_hf_classes import _image, _vlm
from test_shards import _write


def test_distributed_env_reads_the_environment_and_changes_nothing(monkeypatch):
    from mmsmall.train.engine import distributed_env

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    before = dict(os.environ)
    env = distributed_env()
    assert dict(os.environ) == before  # nothing written
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0
    assert "DS_ACCELERATOR" not in env  # already set: not overridden
    monkeypatch.setenv("RANK", "1")  # a launcher's rendezvous is left alone
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(distributed_env())


def test_predictor_leaves_the_callers_model_as_it_was():
    from mmsmall.inference.predictor import Predictor

    vlm = _vlm("tiny").train()
    same = Predictor(vlm)  # already fp32 on the CPU: used as it is
    assert same.model is vlm
    answer = same.predict([_image(1)], ["What is this?"], max_new_tokens=2)
    assert vlm.training  # its mode is back after generating
    cast = Predictor(vlm, dtype="bf16")  # another dtype: a copy, the caller's model untouched
    assert cast.model is not vlm and {p.dtype for p in vlm.parameters()} == {torch.float32}
    assert {p.dtype for p in cast.model.parameters()} == {torch.bfloat16}
    assert Predictor(vlm).predict([_image(1)], ["What is this?"], max_new_tokens=2) == answer


def test_each_reader_warns_about_a_bad_member_once_of_its_own(tmp_path, caplog):
    from mmsmall.data.shards import SampleStream

    d = _write(tmp_path / "a", "a", 6, 6, corrupt={2: "json"})
    caplog.set_level(logging.WARNING, logger="mmsmall.data.shards")
    for _ in range(2):  # two readers, each over three epochs of the shard
        stream = SampleStream([{"path": str(d)}], seed=0)
        for _ in range(15):
            next(stream)
        assert stream.counters["bad_json"] == 3  # counted every time it is read
    warned = [r for r in caplog.records if "bad_json" in r.getMessage()]
    assert len(warned) == 2  # warned once per reader, not once per process
