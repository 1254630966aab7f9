"""Stock transformers Molmo2 export: a tiny SigLIP + OLMo-2 VLM, trained a few steps, exported with
format molmo2 and loaded with AutoModelForImageTextToText / AutoProcessor (no remote code) gives the
same logits (fp32, 1e-4) and the same greedy generations as mmsmall; the reverse adapter too; a
CLIP-style + Qwen2 model is refused with the reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsmall.config import ModelConfig, load_config
from mmsmall.model.vlm import VLM
from mmsmall.processing.points import render_points
from mmsmall.processing.processor import Processor, collate
from mmsmall.processing.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Point to the square."


def _square_image(seed: int) -> tuple[Image.Image, tuple[float, float]]:
    rng = np.random.RandomState(seed)
    h, w = int(rng.randint(80, 220)), int(rng.randint(80, 220))
    arr = (rng.rand(h, w, 3) * 60).astype(np.uint8)
    x, y = int(rng.randint(0, w - 20)), int(rng.randint(0, h - 20))
    arr[y : y + 20, x : x + 20] = (230, 40, 40)
    return Image.fromarray(arr), ((x + 10) / w, (y + 10) / h)


def _train(vlm, processor: Processor, steps: int) -> None:
    """A few plain-AdamW steps so that no weight is at its initial value."""
    opt = torch.optim.AdamW(vlm.parameters(), lr=3e-3)
    vlm.train()
    for step in range(steps):
        examples = []
        for i in range(2):
            img, (x, y) = _square_image(100 * step + i)
            conv = [
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": render_points([(x, y)], "square")},
            ]
            examples.append(processor.encode(img, [conv], train=True, sample_id=f"s{step}-{i}"))
        batch = collate(examples, pad_id=processor.tokenizer.pad_token_id)
        loss = vlm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vlm.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny-molmo2.yaml", cls=ModelConfig)
    tok = build_tokenizer(cfg.tokenizer)
    vlm = VLM(cfg, tok)
    proc = Processor(tok, cfg.image)
    _train(vlm, proc, steps=6)
    saved = tmp_path_factory.mktemp("trained")
    vlm.save_pretrained(saved)
    return vlm, proc, saved


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from mmsmall.export import run_export

    _, _, saved = trained
    out = tmp_path_factory.mktemp("molmo2") / "release"
    return run_export(str(saved), str(out), fmt="molmo2")


def _stock_inputs(processor, image: Image.Image, question: str) -> dict:
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    ]
    return processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_stock_molmo2_matches_ours(trained, exported):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Molmo2ForConditionalGeneration

    vlm, proc, _ = trained
    model = AutoModelForImageTextToText.from_pretrained(exported)
    processor = AutoProcessor.from_pretrained(exported)
    assert isinstance(model, Molmo2ForConditionalGeneration)
    assert type(processor).__name__ == "Molmo2Processor"
    assert (exported / "README.md").read_text().count("| vision |") == 1
    for seed in (7, 8):
        image, _ = _square_image(seed)
        stock = _stock_inputs(processor, image, QUESTION)
        ours = collate(
            [proc.encode_prompt(image, QUESTION)], pad_id=proc.tokenizer.pad_token_id, left_pad=True
        )
        # The stock processor and ours produce the same inputs ...
        assert torch.equal(stock["input_ids"], ours["input_ids"])
        assert torch.equal(stock["image_token_pooling"], ours["image_token_pooling"])
        torch.testing.assert_close(stock["pixel_values"], ours["pixel_values"], rtol=0, atol=1e-6)
        with torch.no_grad():
            ref = model(**stock).logits  # (1, T, V)
            got = vlm(
                **{k: ours[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_token_pooling")}
            )
        # ... and the models the same logits.
        assert (ref - got.logits).abs().max().item() < 1e-4
        new = model.generate(**stock, max_new_tokens=12, do_sample=False)[0, stock["input_ids"].shape[1] :]
        mine = vlm.generate(ours, max_new_tokens=12)[0]
        assert new.tolist() == mine, (new.tolist(), mine)
    # The comparison is sharp: without Molmo2's bidirectional image-token attention it fails.
    vlm.bidirectional_image = False
    try:
        with torch.no_grad():
            causal_only = vlm(
                **{k: ours[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_token_pooling")}
            )
        assert (ref - causal_only.logits).abs().max().item() > 1e-3
    finally:
        vlm.bidirectional_image = True


def test_multi_image_prompts_match_stock(trained, exported):
    """A ``--format molmo2`` export on prompts of 2 and 3 images of mixed sizes (issue 25): the stock
    processor's inputs equal ours and stock ``AutoModelForImageTextToText`` gives our logits (< 1e-4)
    and our greedy tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vlm, proc, _ = trained
    model = AutoModelForImageTextToText.from_pretrained(exported)
    processor = AutoProcessor.from_pretrained(exported)
    for seeds in ((21, 22), (23, 24, 25)):
        images = [_square_image(s)[0] for s in seeds]
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": QUESTION}]
        stock = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            tokenize=True, add_generation_prompt=True, return_tensors="pt", return_dict=True,
        )  # fmt: skip
        ours = collate(
            [proc.encode_prompt(images, QUESTION)], pad_id=proc.tokenizer.pad_token_id, left_pad=True
        )
        assert stock["image_grids"].shape[0] == len(images)
        assert torch.equal(stock["input_ids"], ours["input_ids"])
        assert torch.equal(stock["image_token_pooling"], ours["image_token_pooling"])
        torch.testing.assert_close(stock["pixel_values"], ours["pixel_values"], rtol=0, atol=1e-6)
        with torch.no_grad():
            ref = model(**stock).logits
            got = vlm(
                **{k: ours[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_token_pooling")}
            )
        assert (ref - got.logits).abs().max().item() < 1e-4
        new = model.generate(**stock, max_new_tokens=12, do_sample=False)[0, stock["input_ids"].shape[1] :]
        assert new.tolist() == vlm.generate(ours, max_new_tokens=12)[0]


def test_reverse_adapter_matches_stock(trained, exported):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsmall.export import load_molmo2

    _, proc, _ = trained
    back = load_molmo2(exported)
    model = AutoModelForImageTextToText.from_pretrained(exported)
    processor = AutoProcessor.from_pretrained(exported)
    assert back.cfg.llm.custom["model_type"] == "olmo2" and back.cfg.vision.backend == "hf"
    image, _ = _square_image(11)
    stock = _stock_inputs(processor, image, QUESTION)
    back_proc = Processor(back.tokenizer, back.cfg.image)
    ours = collate(
        [back_proc.encode_prompt(image, QUESTION)], pad_id=back.tokenizer.pad_token_id, left_pad=True
    )
    assert torch.equal(stock["input_ids"], ours["input_ids"])
    with torch.no_grad():
        ref = model(**stock).logits
        got = back(
            **{k: ours[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_token_pooling")}
        )
    assert (ref - got.logits).abs().max().item() < 1e-4
    new = model.generate(**stock, max_new_tokens=12, do_sample=False)[0, stock["input_ids"].shape[1] :]
    mine = back.generate(ours, max_new_tokens=12)[0]
    assert new.tolist() == mine, (new.tolist(), mine)
    # The reverse-loaded model trains in mmsmall: a step changes its loss.
    img, (x, y) = _square_image(12)
    conv = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": render_points([(x, y)], "square")},
    ]
    batch = collate([back_proc.encode(img, [conv])], pad_id=back.tokenizer.pad_token_id)
    opt = torch.optim.AdamW(back.parameters(), lr=1e-3)
    back.train()
    before = back(**batch).loss
    before.backward()
    opt.step()
    with torch.no_grad():
        assert back(**batch).loss.item() != before.item()


def test_non_fitting_model_is_refused(tmp_path):
    from mmsmall.export import Molmo2Incompatible, run_export

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)  # open_clip CLIP-style + Qwen2
    vlm = VLM(cfg, build_tokenizer(cfg.tokenizer))
    vlm.save_pretrained(tmp_path / "clip-qwen2")
    with pytest.raises(Molmo2Incompatible) as err:
        run_export(str(tmp_path / "clip-qwen2"), str(tmp_path / "out"), fmt="molmo2")
    msg = str(err.value)
    assert "class token" in msg and "Qwen2 has q/k/v biases and no q/k RMSNorm" in msg
    assert "bidirectional_image" not in msg  # tiny.yaml keeps Molmo2's image attention
    assert "--format mmsmall" in msg
    assert not (tmp_path / "out").exists()  # refused before anything was written

    from mmsmall.export.molmo2 import check_molmo2_fit

    causal = load_config(
        ROOT / "configs/model/tiny-molmo2.yaml", ["bidirectional_image=false"], cls=ModelConfig
    )
    with pytest.raises(Molmo2Incompatible, match="bidirectional_image=false"):
        check_molmo2_fit(VLM(causal, build_tokenizer(causal.tokenizer)))


def test_qwen3_llm_maps_both_ways(tmp_path):
    """Qwen3 layout (pre-norm, per-head q/k norm, head_dim != hidden/heads, tied embeddings)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmsmall.export import load_molmo2
    from mmsmall.export.release import save_molmo2

    qwen3 = (
        "llm.custom={model_type: qwen3, hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2, head_dim: 32, max_position_embeddings: 512, "
        "rms_norm_eps: 1.0e-6, tie_word_embeddings: true}"
    )
    cfg = load_config(ROOT / "configs/model/tiny-molmo2.yaml", [qwen3], cls=ModelConfig)
    torch.manual_seed(1)
    vlm = VLM(cfg, build_tokenizer(cfg.tokenizer)).eval()
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    save_molmo2(vlm, tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert model.config.text_config.qk_norm_type == "qwen3" and not model.config.text_config.norm_after
    stock = _stock_inputs(AutoProcessor.from_pretrained(tmp_path), _square_image(3)[0], QUESTION)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_token_pooling")
    back = load_molmo2(tmp_path)
    assert back.cfg.llm.custom["model_type"] == "qwen3"
    with torch.no_grad():
        ref = model(**stock).logits
        assert (ref - vlm(**{k: stock[k] for k in keys}).logits).abs().max().item() < 1e-4
        assert (ref - back(**{k: stock[k] for k in keys}).logits).abs().max().item() < 1e-4


def test_timm_siglip_tower_maps_to_molmo2_vision():
    """open_clip's SigLIP towers are timm ViTs (no class token, fused qkv): their blocks map onto
    Molmo2VisionModel exactly; a timm ViT with a class token is refused."""
    from timm.models.vision_transformer import VisionTransformer
    from transformers import Molmo2VisionConfig, Molmo2VisionModel

    from mmsmall.export import Molmo2Incompatible
    from mmsmall.export.molmo2 import vision_to_molmo2
    from mmsmall.model.vision import patchify

    torch.manual_seed(0)
    kw = dict(img_size=56, patch_size=14, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=0)
    trunk = VisionTransformer(class_token=False, global_pool="map", act_layer="gelu_tanh", **kw).eval()
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fields, weights = vision_to_molmo2(trunk)
    assert fields["hidden_act"] == "gelu_pytorch_tanh" and fields["num_hidden_layers"] == 3
    molmo_vit = Molmo2VisionModel(Molmo2VisionConfig(image_size=[56, 56], **fields)).eval()
    molmo_vit.load_state_dict(weights, strict=True)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = trunk.forward_intermediates(images, indices=[0, 2], intermediates_only=True, output_fmt="NLC")
        hidden = molmo_vit(patchify(images, 14), output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden[3], ref[1], rtol=0, atol=1e-5)

    clip_like = VisionTransformer(class_token=True, global_pool="token", **kw)
    with pytest.raises(Molmo2Incompatible, match="prefix token"):
        vision_to_molmo2(clip_like)
