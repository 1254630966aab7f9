"""LoRA fine-tuning (peft) of an imported stock Molmo2, through launch/train.sh under DeepSpeed ZeRO-2 with
activation checkpointing, 10 steps:

- only the adapters (LLM and ViT) and the connector change; every frozen base weight is bit-identical;
- the loss falls; a restart from the step-5 checkpoint gives the same losses and weights (exact resume);
- ``mmsmall export --format molmo2`` merges the adapters: stock ``AutoModelForImageTextToText`` loads it
  with no adapter code, its weights differ from the imported ones and its logits equal ours;
  the merged model's logits equal the unmerged (peft layers) model's within 1e-5;
- ``--adapter-only`` writes peft adapter folders that ``PeftModel.from_pretrained`` puts on the base,
  recording that base (``load_vlm`` of the folder puts them on it);
- QLoRA (bitsandbytes NF4 base, its CPU backend) through the same launcher: the 4-bit base is frozen,
  a restart is exact, and the export is a plain model stock transformers loads.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from test_import_molmo2 import build_stock_molmo2, stock_inputs
from test_train import _env  # subprocess env: CPU DeepSpeed, offline, no inherited rank

from data_tools.shards import ShardWriter
from mmsmall.train.monitor import read_log

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("input_ids", "attention_mask", "pixel_values", "image_token_pooling")
pytestmark = pytest.mark.slow


def _picture(i: int) -> Image.Image:
    colors = [(220, 30, 30), (30, 180, 60), (40, 60, 220)]
    w, h = 50 + 9 * (i % 5), 40 + 7 * (i % 4)
    im = Image.new("RGB", (w, h), (245, 245, 245))
    ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colors[i % 3])
    return im


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mmsmall.export.importer import import_molmo2

    root = tmp_path_factory.mktemp("lora")
    stock = build_stock_molmo2(root / "stock")
    import_molmo2(stock, root / "imported")
    with ShardWriter(root / "shards", prefix="toy", max_count=12) as w:
        for i in range(24):
            buf = io.BytesIO()
            _picture(i).save(buf, "PNG")
            color = ["red", "green", "blue"][i % 3]
            messages = [{"role": "user", "content": "What color?"}, {"role": "assistant", "content": color}]
            w.write(
                f"toy_{i:03d}", buf.getvalue(), "png", {"id": f"toy{i}", "task": "vqa", "messages": messages}
            )
    return root


def _train(root: Path, out: str, *extra: str) -> Path:
    cmd = [
        "bash", str(ROOT / "launch" / "train.sh"), "configs/train/lora-finetune.yaml",
        f"out_dir={root / out}", f"data.train=[{{path: {root / 'shards'}}}]", f"train.init_from={root / 'imported'}",
        "train.steps=10", "train.save_every=5", "train.tensorboard=false", "train.activation_checkpointing=true",
        "train.lora.enabled=true", "train.lora.llm.rank=4", "train.lora.llm.alpha=8", "train.lora.llm.dropout=0.05",
        "train.lora.vision.rank=2", "train.lora.vision.alpha=4", "train.lora.vision.target_modules=[q_proj,v_proj]",
        "train.lr={connector: 1.0e-2, vision: 1.0e-2, llm: 1.0e-2}", "train.warmup={connector: 1, vision: 1, llm: 1}",
        "train.grad_accum=1", "train.micro_batch_size=2", "train.precision=fp32", "train.log_every=1",
        "data.seq_len=384", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / out


def _inputs(vlm, seed: int) -> dict:
    """A prompt the way the model was trained: the imported release's own chat template."""
    from mmsmall.inference.chat_template import ChatTemplateProcessor
    from mmsmall.processing.processor import collate

    assert vlm.cfg.prompt == "chat_template"  # fine-tuning kept the import's template
    proc = ChatTemplateProcessor(vlm.tokenizer, vlm.cfg.image)
    return collate(
        [proc.encode_prompt(_picture(seed), "What color?")], vlm.tokenizer.pad_token_id, left_pad=True
    )


def test_lora_trains_adapters_only_resumes_exactly_and_exports(setup):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsmall.export.consolidate import consolidate_deepspeed
    from mmsmall.export.load import load_model, load_vlm

    straight = _train(setup, "straight")
    losses = {r["step"]: r["loss"] for r in read_log(straight / "log.jsonl")}
    assert sorted(losses) == list(range(1, 11))
    assert sum(losses[s] for s in (8, 9, 10)) < sum(losses[s] for s in (1, 2, 3)) - 0.3, losses

    base = load_model(setup / "imported").eval()
    init = base.state_dict()
    state = consolidate_deepspeed(straight / "checkpoints" / "step_00000010")
    lora_keys = [k for k in state if "lora_" in k]
    assert any(k.startswith("llm.") for k in lora_keys) and any(k.startswith("vision.") for k in lora_keys)
    assert all(state[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # B starts at 0: trained
    for k, t in state.items():
        if "lora_" in k:
            continue
        plain = k.replace(".base_layer.", ".")
        if k.startswith("connector."):
            assert not torch.equal(t, init[plain]), k  # the connector trains fully
        else:
            assert torch.equal(t, init[plain]), k  # the frozen base is bit-identical

    # a restart from the step-5 checkpoint (adapters, optimizer, schedule, RNG, data position)
    resumed = setup / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    (resumed / "checkpoints" / "latest").write_text("step_00000005")
    _train(setup, "resumed")
    assert {r["step"]: r["loss"] for r in read_log(resumed / "log.jsonl")} == {
        s: losses[s] for s in range(6, 11)
    }
    again = consolidate_deepspeed(resumed / "checkpoints" / "step_00000010")
    assert all(torch.equal(again[k], state[k]) for k in state)

    merged, _ = load_vlm(straight)
    unmerged, _ = load_vlm(straight, merge_lora=False)
    assert not any("lora_" in k for k in merged.state_dict()) and any(
        "lora_" in k for k in unmerged.state_dict()
    )
    batch = _inputs(merged, 3)
    with torch.no_grad():
        n = merged.cfg.emit_vocab  # the ids from n on are input-only: -inf in both
        ours = unmerged(**{k: batch[k] for k in KEYS}).logits
        assert torch.isneginf(ours[..., n:]).all() and ours.shape[-1] > n
        assert (merged(**{k: batch[k] for k in KEYS}).logits - ours)[..., :n].abs().max().item() < 1e-5

    env = _env()
    mm = [sys.executable, "-m", "mmsmall.cli", "export", str(straight)]
    for args in ([str(setup / "release"), "--format", "molmo2"], [str(setup / "adapters"), "--adapter-only"]):
        proc = subprocess.run(mm + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    stock = AutoModelForImageTextToText.from_pretrained(setup / "release").eval()  # no peft involved
    source = AutoModelForImageTextToText.from_pretrained(setup / "stock").eval()
    proj = "model.multi_modal_projector.image_projector.gate_proj.weight"
    qkv = "model.language_model.layers.0.self_attn.q_proj.weight"
    for name in (proj, qkv):
        assert not torch.equal(stock.state_dict()[name], source.state_dict()[name]), name
    with torch.no_grad():
        stock_in = stock_inputs(AutoProcessor.from_pretrained(setup / "release"), _picture(3), "What color?")
        assert torch.equal(
            stock_in["input_ids"], batch["input_ids"]
        )  # the release's own processor, same prompt
        ref = stock(**stock_in).logits  # (1, T, text vocab)
    assert ref.shape[-1] == n and (ref - ours[..., :n]).abs().max().item() < 1e-4

    # the adapters record their base; mmsmall loads them onto it (chat, eval, export take the folder)
    meta = json.loads((setup / "adapters" / "adapters.json").read_text())
    assert meta["base_model"] == str((setup / "imported").resolve()) and meta["base_fingerprint"]
    with torch.no_grad():
        again = load_vlm(setup / "adapters")[0](**{k: batch[k] for k in KEYS}).logits
        assert (again - ours)[..., :n].abs().max().item() < 1e-5
    llm = PeftModel.from_pretrained(base.llm, str(setup / "adapters" / "llm"))
    base.llm = llm
    base.vision = PeftModel.from_pretrained(base.vision, str(setup / "adapters" / "vision"))
    base.connector.load_state_dict(load_file(setup / "adapters" / "connector.safetensors"))
    with torch.no_grad():
        assert (base(**{k: batch[k] for k in KEYS}).logits - ours)[..., :n].abs().max().item() < 1e-5


def test_qlora_trains_on_a_4bit_base_resumes_exactly_and_exports_plain(setup):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsmall.export.consolidate import consolidate_deepspeed
    from mmsmall.export.load import load_model, load_vlm
    from mmsmall.model.lora import quantize_base

    qlora = ("train.lora.qlora=true", "train.lora.vision.rank=0", "train.steps=6", "train.save_every=3")
    straight = _train(setup, "q_straight", *qlora)
    losses = {r["step"]: r["loss"] for r in read_log(straight / "log.jsonl")}
    assert sorted(losses) == list(range(1, 7)) and losses[5] + losses[6] < losses[1] + losses[2] - 0.2, losses

    state = consolidate_deepspeed(straight / "checkpoints" / "step_00000006")
    base = load_model(setup / "imported")
    assert quantize_base(base.llm) > 0
    quantized = {k: t for k, t in base.state_dict().items() if k.startswith("llm.")}
    assert any(t.dtype == torch.uint8 for t in quantized.values())  # the packed NF4 weights
    for k, t in quantized.items():  # frozen: the checkpoint's base is the imported weights quantized
        layer, _, rest = k.partition(".weight")
        saved = state.get(f"{layer}.base_layer.weight{rest}", state.get(k))
        assert saved is not None and torch.equal(saved, t), k
    assert all(state[k].abs().sum() > 0 for k in state if "lora_B" in k)

    resumed = setup / "q_resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    (resumed / "checkpoints" / "latest").write_text("step_00000003")
    _train(setup, "q_resumed", *qlora)
    assert {r["step"]: r["loss"] for r in read_log(resumed / "log.jsonl")} == {
        s: losses[s] for s in (4, 5, 6)
    }
    again = consolidate_deepspeed(resumed / "checkpoints" / "step_00000006")
    assert all(torch.equal(again[k], state[k]) for k in state)

    merged, _ = load_vlm(straight)  # dequantized base + adapters: plain layers only
    assert not any(t.dtype == torch.uint8 for t in merged.state_dict().values())
    proc = subprocess.run(
        [sys.executable, "-m", "mmsmall.cli", "export", str(straight), str(setup / "q_release"), "--format", "molmo2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = AutoModelForImageTextToText.from_pretrained(setup / "q_release").eval()
    source = AutoModelForImageTextToText.from_pretrained(setup / "stock").eval()
    qkv = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(stock.state_dict()[qkv], source.state_dict()[qkv])  # NF4 rounding + adapters
    batch = _inputs(merged, 3)
    with torch.no_grad():
        n = merged.cfg.emit_vocab
        ours = merged(**{k: batch[k] for k in KEYS}).logits[..., :n]
        theirs = stock(
            **stock_inputs(AutoProcessor.from_pretrained(setup / "q_release"), _picture(3), "What color?")
        )
    assert (ours - theirs.logits).abs().max().item() < 1e-4
