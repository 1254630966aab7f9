"""Our HF classes: save_pretrained -> AutoModelForImageTextToText / AutoProcessor.from_pretrained
round-trips to identical logits and generations (SigLIP + OLMo-2 through transformers' loader,
open_clip + Qwen2 through the CPU loader), sharded folders included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsmall.config import ModelConfig, load_config
from mmsmall.model.vlm import VLM
from mmsmall.processing.processor import Processor, collate
from mmsmall.processing.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("input_ids", "attention_mask", "pixel_values", "image_token_pooling")


def _vlm(name: str):
    torch.manual_seed(0)
    cfg = load_config(ROOT / f"configs/model/{name}.yaml", cls=ModelConfig)
    vlm = VLM(cfg, build_tokenizer(cfg.tokenizer)).eval()
    with torch.no_grad():  # move norms off their all-ones init, so a lost weight would show
        for n, p in vlm.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return vlm


def _image(seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(
        (rng.rand(int(rng.randint(60, 200)), int(rng.randint(60, 200)), 3) * 255).astype("uint8")
    )


@pytest.mark.parametrize("name", ["tiny-molmo2", "tiny"])
def test_save_load_roundtrip_identical(name, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsmall.export.hf import MMSmallForConditionalGeneration, MMSmallProcessor
    from mmsmall.export.release import save_mmsmall

    vlm = _vlm(name)
    trained = {k: v.clone() for k, v in vlm.state_dict().items()}
    save_mmsmall(vlm, tmp_path)
    # wrapping for export must not re-initialize the (shared) weights of the trained model
    assert all(torch.equal(v, trained[k]) for k, v in vlm.state_dict().items())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mmsmall" and config["architectures"] == [
        "MMSmallForConditionalGeneration"
    ]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(model, MMSmallForConditionalGeneration) and isinstance(processor, MMSmallProcessor)
    loaded = model.vlm.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())
    assert processor.chat_template and "Assistant:" in processor.chat_template

    images, questions = [_image(1), _image(2)], ["What is shown?", "Count the dots."]
    inputs = processor(images=images, text=questions)  # left-padded batch
    ours = collate(
        [Processor(vlm.tokenizer, vlm.cfg.image).encode_prompt(i, q) for i, q in zip(images, questions)],
        pad_id=vlm.tokenizer.pad_token_id,
        left_pad=True,
    )
    assert torch.equal(inputs["input_ids"], ours["input_ids"])
    with torch.no_grad():
        ref = vlm(**{k: ours[k] for k in KEYS}).logits
        got = model(**inputs).logits
    assert torch.equal(ref, got)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": questions[0]}],
        }
    ]
    assert processor.apply_chat_template(messages).endswith(" User: What is shown? Assistant:")
    templated = processor.apply_chat_template(messages, tokenize=True)
    assert torch.equal(templated["input_ids"][0], ours["input_ids"][0][ours["attention_mask"][0].bool()])

    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    expected = vlm.generate(ours, max_new_tokens=8)
    for row, exp in zip(generated.tolist(), expected):
        assert row[: len(exp)] == exp
        assert all(t == vlm.tokenizer.pad_token_id for t in row[len(exp) :])  # only padding after EOS


def test_sharded_export_from_saved_vlm(tmp_path):
    from transformers import AutoModelForImageTextToText

    from mmsmall.export import run_export

    vlm = _vlm("tiny-molmo2")
    vlm.save_pretrained(tmp_path / "saved")
    out = run_export(
        str(tmp_path / "saved"), str(tmp_path / "release"), fmt="mmsmall", max_shard_size="200KB"
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert set(json.loads((out / "checksums.json").read_text())["files"]) == set(shards)
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "## Limitations" in card and "license: apache-2.0" in card
    model = AutoModelForImageTextToText.from_pretrained(out)
    ids = torch.tensor([[vlm.tokenizer.bos_token_id, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, vlm(input_ids=ids).logits)


def test_model_card_eval_table(tmp_path):
    from mmsmall.export.card import eval_table, model_card

    results = {
        "convention": "lmms-eval",
        "tasks": {"chartqa": {"primary": "relaxed_accuracy", "score": 41.25, "n": 40}},
    }
    table = eval_table(results)
    assert "| chartqa | relaxed_accuracy | 41.25 | 40 |" in table
    card = model_card(
        _vlm("tiny-molmo2"),
        "molmo2",
        run_config={"data": {"train": [{"path": "shards/a"}]}},
        eval_results=results,
    )
    assert "41.25" in card and "`shards/a`" in card and "Molmo2ForConditionalGeneration" in card
