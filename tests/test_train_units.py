"""Training pieces without DeepSpeed runs: the filled DS config, the per-module schedule, param groups."""

import math

import pytest
import torch
from torch import nn

from mmsmall.config import load_config
from mmsmall.train.engine import ds_config, freeze_modules, param_groups, zero_stage
from mmsmall.train.schedule import build_scheduler, warmup_cosine


def _cfg(*overrides):
    return load_config("configs/train/tiny-pretrain.yaml", ["data.train=[{path: /x}]", *overrides])


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = nn.Linear(4, 4)
        self.connector = nn.Linear(4, 8)
        self.llm = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8))
        self.llm.config = type("C", (), {"hidden_size": 8})()


def test_ds_config_fills_auto_from_run_config():
    c = ds_config(_cfg("train.micro_batch_size=3", "train.grad_accum=4", "train.clip_grad=0.5"), 2)
    assert c["train_micro_batch_size_per_gpu"] == 3 and c["gradient_accumulation_steps"] == 4
    assert c["train_batch_size"] == 24 and c["gradient_clipping"] == 0.5
    assert c["bf16"]["enabled"] is False and c["communication_data_type"] == "fp32"
    z3 = ds_config(
        _cfg("train.deepspeed=configs/deepspeed/zero3_offload.json", "train.precision=bf16"), 1, _Toy()
    )
    assert z3["bf16"]["enabled"] is True and z3["zero_optimization"]["reduce_bucket_size"] == 64
    with pytest.raises(ValueError, match="no source"):  # ZeRO-3 buckets need the model's width
        ds_config(_cfg("train.deepspeed=configs/deepspeed/zero3.json"), 1)


def test_zero3_pieces_need_no_built_model(tmp_path):
    """ZeRO-3 builds the model partitioned, so its bucket sizes come from configs alone, and a
    partitioned matrix (a 1-D slice with ds_shape) still goes to a decayed group."""
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer
    from mmsmall.train.zero_init import llm_hidden_size

    cfg = _cfg("train.deepspeed=configs/deepspeed/zero3.json")
    assert zero_stage(cfg) == 3 and zero_stage(_cfg()) == 2
    assert llm_hidden_size(cfg) == 64  # model.llm.custom
    assert ds_config(cfg, 1, hidden_size=64)["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    wide = _cfg()
    wide.model.llm.custom = {**wide.model.llm.custom, "hidden_size": 96}
    folder = VLM(wide.model, build_tokenizer(wide.model.tokenizer)).save_pretrained(tmp_path / "m")
    assert llm_hidden_size(_cfg(f"train.init_from={folder}")) == 96  # the folder's LLM, not model.llm
    model = _Toy()
    model.connector.weight.data, model.connector.weight.ds_shape = torch.empty(0), (8, 4)
    groups = {g["name"]: g["params"] for g in param_groups(model, cfg.train)}
    assert any(p is model.connector.weight for p in groups["connector"])


def test_schedule_per_module_warmup_then_cosine():
    f = warmup_cosine(4, 20, 0.1)
    assert [f(k) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(f(20), 0.1) and math.isclose(f(100), 0.1)
    assert f(10) < f(5) < 1.0
    model = _Toy()
    cfg = _cfg("train.warmup.connector=1", "train.warmup.llm=10", "train.freeze=[vision]")
    freeze_modules(model, cfg.train.freeze)
    groups = param_groups(model, cfg.train)
    assert {g["name"] for g in groups} == {"connector", "connector_no_decay", "llm", "llm_no_decay"}
    assert not any(p.requires_grad for p in model.vision.parameters())
    opt = torch.optim.AdamW(groups)
    sched = build_scheduler(opt, cfg.train)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["connector"] == pytest.approx(cfg.train.lr.connector)  # warm-up of 1 step: full lr
    assert lrs["llm"] == pytest.approx(cfg.train.lr.llm / 10)
    opt.step()
    sched.step()
    assert opt.param_groups[[g["name"] for g in opt.param_groups].index("llm")]["lr"] == pytest.approx(
        cfg.train.lr.llm * 0.2
    )
