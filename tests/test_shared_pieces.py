"""Pieces that used to be written twice (or four times), now one each, tested once as the one copy:
the target count, a parameter's full size under ZeRO-3, the curation done-marker, the launcher's
``--local_rank`` and the eval command line behind ``mmsmall eval`` and ``python -m eval``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from mmsmall.processing.batch import IGNORE_INDEX, count_targets

ROOT = Path(__file__).resolve().parent.parent


def _labels() -> torch.Tensor:
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 0] = 5  # position 0 is never a target: nothing predicts it
    labels[0, 3:5] = 7
    labels[1, 1:] = 9
    return labels


def test_target_count_is_the_shifted_labels_everywhere():
    from test_hf_classes import _vlm

    from mmsmall.data.loader import batch_counts
    from mmsmall.train.flops import FlopCounter

    labels = _labels()
    assert int(count_targets(labels)) == 2 + 5
    batch = {"labels": labels, "attention_mask": torch.ones_like(labels), "doc_ids": torch.zeros_like(labels)}
    assert batch_counts(batch) == (7, 12)
    vlm = _vlm("tiny")
    ids = torch.randint(10, 100, labels.shape)
    with torch.no_grad():
        out = vlm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        summed = vlm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, loss_reduction="sum")
    torch.testing.assert_close(out.loss * 7, summed.loss, rtol=1e-5, atol=1e-6)  # "mean" divides by the 7
    counter = FlopCounter(vlm, freeze=[])
    no_targets = {**batch, "labels": torch.full_like(labels, IGNORE_INDEX)}
    per_target = (counter.step_flops(batch) - counter.step_flops(no_targets)) / 7
    assert per_target == counter.k_llm * counter.n_head  # each target costs one head pass


def test_full_numel_reads_zero3_sizes():
    from mmsmall.model.params import full_numel, full_shape
    from mmsmall.train.flops import _dense_params

    layer = nn.Linear(4, 3)
    assert full_numel(layer.weight) == 12 and full_shape(layer.weight) == (3, 4)
    assert _dense_params(layer) == 15
    for p, n, shape in ((layer.weight, 120, (30, 4)), (layer.bias, 30, (30,))):
        p.ds_numel, p.ds_shape = n, shape  # what deepspeed.zero.Init leaves on a partitioned parameter
    assert full_numel(layer.weight) == 120 and full_shape(layer.bias) == (30,)
    assert _dense_params(layer) == 150


def test_finished_unit_needs_the_same_key_and_unchanged_reads(tmp_path):
    from data_tools.curate import file_stat, finished_unit

    unit = {"uid": "u000001", "key": "abc"}
    assert finished_unit(tmp_path, unit) is None
    img = tmp_path / "a.jpg"
    img.write_bytes(b"x")
    done = {"uid": "u000001", "key": "abc", "n_in": 3, "reads": {str(img): file_stat(str(img))}}
    (tmp_path / "u000001.done.json").write_text(json.dumps(done))
    assert finished_unit(tmp_path, unit)["n_in"] == 3
    assert finished_unit(tmp_path, unit | {"key": "other"}) is None
    img.write_bytes(b"xy")  # a file it read changed
    assert finished_unit(tmp_path, unit) is None


def test_trainer_drops_the_launchers_local_rank(capsys):
    from mmsmall.train.loop import main

    assert main(["--local_rank=0"]) == 2  # nothing but the launcher's argument: the usage
    assert main(["--local_rank=1", "--help"]) == 0
    assert "usage: python -m mmsmall.train CONFIG" in capsys.readouterr().out


def test_one_eval_command_line_behind_both_entry_points():
    from typer.testing import CliRunner

    from eval.__main__ import parse_data
    from mmsmall.cli import app

    assert parse_data(["chartqa=/a", "docvqa=/b,textvqa=/c"]) == {
        "chartqa": "/a",
        "docvqa": "/b",
        "textvqa": "/c",
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    module = subprocess.run(
        [sys.executable, "-m", "eval", "--list-tasks"], env=env, capture_output=True, text=True
    )
    assert module.returncode == 0, module.stderr[-2000:]
    app_out = CliRunner().invoke(app, ["eval", "--list-tasks"])
    assert app_out.exit_code == 0 and app_out.output == module.stdout and "chartqa" in module.stdout
    bad = CliRunner().invoke(app, ["eval", "--model", "m", "--tasks", "chartqa", "--data", "nopath"])
    assert bad.exit_code == 1 and "--data 'nopath': expected TASK=PATH" in bad.output


def test_one_offline_builder_and_the_training_builder_returns_its_config(tmp_path):
    """load_model without weights is what every folder kind and the HF class build through: no
    weights downloaded, names kept on vlm.cfg. build_model leaves the caller's config alone."""
    from test_hf_classes import _vlm

    from mmsmall.config import load_config
    from mmsmall.export.hf import MMSmallConfig
    from mmsmall.export.load import Source, load_model
    from mmsmall.model.vlm import folder_configs, offline_config
    from mmsmall.train.zero_init import build_model

    vlm = _vlm("tiny")
    vlm.save_pretrained(tmp_path / "m")
    llm, vision = folder_configs(tmp_path / "m")
    assert llm["hidden_size"] == vlm.llm.config.hidden_size and vision is None  # open_clip: its own custom
    offline = offline_config(vlm.cfg, llm, vision)
    assert offline.llm.name is None and offline.llm.custom == llm and offline.vision.pretrained is None
    rebuilt = load_model(
        Source("config", cfg=vlm.cfg, tokenizer=vlm.tokenizer, configs=(llm, vision)), weights=False
    )
    assert rebuilt.cfg is vlm.cfg and set(rebuilt.state_dict()) == set(vlm.state_dict())
    loaded = load_model(tmp_path / "m")
    assert all(torch.equal(v, vlm.state_dict()[k]) for k, v in loaded.state_dict().items())
    hf_cfg = MMSmallConfig.from_vlm(vlm)
    assert hf_cfg.build_model_config() == offline_config(
        hf_cfg.saved_model_config(), *hf_cfg.stored_configs()
    )

    run = load_config(
        ROOT / "configs/train/tiny-pretrain.yaml",
        [f"train.init_from={tmp_path / 'm'}", "model.connector.mlp_hidden=7"],
    )
    built = build_model(run, world_size=1)
    assert run.model.connector.mlp_hidden == 7  # the caller's config is not changed
    assert built.run_cfg.model.connector.mlp_hidden == vlm.cfg.connector.mlp_hidden
    assert built.run_cfg.train is run.train and built.model.cfg is built.run_cfg.model


def test_the_loop_passes_the_model_only_what_it_takes():
    from mmsmall.processing.batch import MODEL_KEYS, model_inputs
    from mmsmall.train.loop import _to_device

    labels = _labels()
    batch = {
        "input_ids": torch.ones_like(labels), "labels": labels, "attention_mask": torch.ones_like(labels),
        "pixel_values": torch.zeros(1, 4, 3, dtype=torch.float64), "image_grids": torch.zeros(1, 4),
        "sample_ids": ["a", "b"],
    }  # fmt: skip
    assert (
        set(model_inputs(batch))
        == {"input_ids", "labels", "attention_mask", "pixel_values"}
        <= set(MODEL_KEYS)
    )
    moved = _to_device(batch, torch.device("cpu"), torch.float32)
    assert set(moved) == set(model_inputs(batch)) and moved["pixel_values"].dtype == torch.float32
