"""Vision towers: the patch layout matches Molmo2, and layer features equal the libraries' own."""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.molmo2.image_processing_molmo2 import batch_pixels_to_patches

from mmsmall.config import ImageConfig, ModelConfig, VisionConfig, load_config
from mmsmall.model.vision import VisionTower, patchify, unpatchify

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)


@pytest.fixture(scope="module")
def tiny_molmo2() -> ModelConfig:
    return load_config(ROOT / "configs/model/tiny-molmo2.yaml", cls=ModelConfig)


def test_patch_layout_matches_molmo2_image_processor():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 28, 42)  # (N, C, H, W), a 2x3 grid of 14-px patches
    theirs = batch_pixels_to_patches(images.permute(0, 2, 3, 1), 14)  # takes (N, H, W, C)
    ours = patchify(images, 14)
    assert ours.shape == (3, 6, 14 * 14 * 3)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpatchify(theirs, 2, 3, 14), images)


def _with_layers(cfg: ModelConfig, layers: list[int]) -> ModelConfig:
    cfg = copy.deepcopy(cfg)
    cfg.vision.layers = layers
    return cfg


def test_open_clip_layers_equal_forward_intermediates(tiny):
    cfg = _with_layers(tiny, [-2, 0])  # 4 blocks: blocks 2 and 0; block 3 is pruned
    torch.manual_seed(0)
    tower = VisionTower(cfg.vision, cfg.image).eval()
    assert tower.layer_indices == [2, 0] and tower.num_blocks == 3
    assert (tower.hidden_size, tower.num_heads, tower.patch_size) == (64, 4, 14)
    assert len(tower.backbone.visual.transformer.resblocks) == 3

    ref = open_clip.create_model(cfg.vision.name, pretrained=None).visual.eval()  # unpruned, 4 blocks
    missing, unexpected = ref.load_state_dict(tower.backbone.visual.state_dict(), strict=False)
    assert not unexpected and all(
        k.startswith(("transformer.resblocks.3.", "ln_post", "proj")) for k in missing
    )

    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        got = tower(patchify(images, 14))  # (N, P, 2 * D)
        inter = ref.forward_intermediates(images, indices=[0, 2], intermediates_only=True, output_fmt="NLC")
    block0, block2 = inter["image_intermediates"]  # (N, P, D) each, class token already removed
    assert got.shape == (2, 64, 128)
    torch.testing.assert_close(got, torch.cat([block2, block0], -1), rtol=0, atol=0)


def test_hf_siglip_layers_equal_output_hidden_states(tiny_molmo2):
    cfg = _with_layers(tiny_molmo2, [-2, 0])
    torch.manual_seed(0)
    tower = VisionTower(cfg.vision, cfg.image).eval()
    assert len(tower.backbone.model.encoder.layers) == 3
    custom = dict(cfg.vision.custom)
    custom.pop("model_type")
    ref = SiglipVisionModel(SiglipVisionConfig(**custom)).eval()
    missing, unexpected = ref.load_state_dict(tower.backbone.model.state_dict(), strict=False)
    assert not unexpected and all(".layers.3." in k for k in missing)

    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        got = tower(patchify(images, 14))
        hidden = ref(pixel_values=images, output_hidden_states=True).hidden_states  # [emb, b0, ..., b3]
    torch.testing.assert_close(got, torch.cat([hidden[3], hidden[1]], -1), rtol=0, atol=0)


def test_hf_clip_drops_the_class_token(tiny):
    cfg = copy.deepcopy(tiny)
    cfg.vision.backend = "hf"
    cfg.vision.custom = {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 112,
        "patch_size": 14,
    }
    cfg.vision.layers = [-1]
    torch.manual_seed(0)
    tower = VisionTower(cfg.vision, cfg.image).eval()
    ref = CLIPVisionModel(
        CLIPVisionConfig(**{k: v for k, v in cfg.vision.custom.items() if k != "model_type"})
    )
    ref.load_state_dict(tower.backbone.model.state_dict())
    images = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        got = tower(patchify(images, 14))
        last = ref.eval()(pixel_values=images, output_hidden_states=True).hidden_states[-1]  # (1, 1 + 64, D)
    assert got.shape == (1, 64, 32)
    torch.testing.assert_close(got, last[:, 1:], rtol=0, atol=0)


def test_config_mismatches_raise_clear_errors(tiny):
    cfg = copy.deepcopy(tiny)
    cfg.image.crop_size = 224
    with pytest.raises(ValueError, match="crop_size=224"):
        VisionTower(cfg.vision, cfg.image)
    cfg = _with_layers(tiny, [-1, 4])
    with pytest.raises(ValueError, match="out of range"):
        VisionTower(cfg.vision, cfg.image)
    cfg = copy.deepcopy(tiny)
    del cfg.vision.custom["text_cfg"]
    with pytest.raises(ValueError, match="lacks"):
        VisionTower(cfg.vision, cfg.image)
    tower = VisionTower(tiny.vision, tiny.image)
    with pytest.raises(ValueError, match="patches per crop"):
        tower(torch.zeros(1, 49, 588))


def test_hf_tower_loads_the_image_half_of_a_saved_siglip_checkpoint(tiny_molmo2, tmp_path):
    from transformers import SiglipConfig, SiglipModel

    vision = {k: v for k, v in tiny_molmo2.vision.custom.items() if k != "model_type"}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    full = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    full.save_pretrained(tmp_path / "siglip")
    cfg = copy.deepcopy(tiny_molmo2)
    cfg.vision.custom, cfg.vision.name, cfg.vision.layers = None, str(tmp_path / "siglip"), [-1, 1]
    tower = VisionTower(cfg.vision, cfg.image).eval()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        got = tower(patchify(images, 14))
        hidden = full.vision_model(pixel_values=images, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got, torch.cat([hidden[4], hidden[2]], -1), rtol=0, atol=0)


def test_open_clip_timm_tower_equals_timm_forward_intermediates():
    """The SigLIP-family path (open_clip TimmModel): a small timm ViT with a class token."""
    custom = {
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    vision = VisionConfig(backend="open_clip", name="mmsmall-test-timm-vit", custom=custom, layers=[-2, 3])
    torch.manual_seed(0)
    tower = VisionTower(vision, ImageConfig(crop_size=224, patch_size=16)).eval()
    assert (tower.hidden_size, tower.num_heads, tower.patch_size, tower.layer_indices) == (
        192,
        3,
        16,
        [10, 3],
    )
    assert len(tower.backbone.visual.trunk.blocks) == 11  # the 12th block is pruned
    ref = open_clip.create_model("mmsmall-test-timm-vit", pretrained=None).visual.eval()
    missing, unexpected = ref.load_state_dict(tower.backbone.visual.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("trunk.blocks.11.", "trunk.norm", "head")) for k in missing)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        got = tower(patchify(images, 16))
        block3, block10 = ref.trunk.forward_intermediates(
            images, indices=[3, 10], intermediates_only=True, output_fmt="NLC"
        )
    assert got.shape == (1, 196, 384)  # the class token is dropped
    torch.testing.assert_close(got, torch.cat([block10, block3], -1), rtol=0, atol=0)
