"""Activation checkpointing through ``VLM.set_activation_checkpointing``, both vision backends.

Recomputation is observed, not assumed: forward pre-hooks count how often the MLP inside each ViT
block and each LLM decoder layer runs during one forward + backward (1 without checkpointing, 2 with: the
recompute in backward). Gradients equal the run without within fp32 tolerance.
"""

from __future__ import annotations

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


def _vit_blocks(model) -> list[torch.nn.Module]:
    backbone = model.vision.backbone
    if model.cfg.vision.backend == "open_clip":
        return list(backbone.visual.transformer.resblocks)
    return list(getattr(backbone.model, "vision_model", backbone.model).encoder.layers)


def _batch(cfg: ModelConfig, tok) -> dict:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8))
    proc = Processor(tok, cfg.image)
    messages = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "a cat"}]
    return collate([proc.encode(image, [messages], sample_id="0")], tok.pad_token_id)


def _counter(counts: list[int], i: int):
    # On a block's MLP, inside what is recomputed: transformers checkpoints a layer's forward, so
    # the layer's own hooks run once. A pre-hook: torch's non-reentrant checkpoint stops a
    # recompute as soon as it has what backward needs, before post-hooks would run.
    def hook(*_):
        counts[i] += 1

    return hook


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-molmo2.yaml"])
def test_checkpointing_recomputes_vit_blocks_and_llm_layers_with_equal_gradients(config):
    cfg = load_config(ROOT / "configs/model" / config, cls=ModelConfig)
    tok = build_tokenizer(cfg.tokenizer, cfg.llm.name)
    torch.manual_seed(0)
    reference = VLM(cfg, tok)
    batch = _batch(cfg, tok)
    results = {}
    for enable in (False, True):
        model = VLM(cfg, tok).train()
        model.load_state_dict(reference.state_dict())
        model.set_activation_checkpointing(enable)
        blocks = {"vit": _vit_blocks(model), "llm": list(model.llm.model.layers)}
        calls = {k: [0] * len(v) for k, v in blocks.items()}
        for kind, mods in blocks.items():
            for i, m in enumerate(mods):
                m.mlp.register_forward_pre_hook(_counter(calls[kind], i))
        model(**batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[enable] = (calls, grads)
    (plain_calls, plain), (ckpt_calls, ckpt) = results[False], results[True]
    used = model.vision.num_blocks  # blocks past the deepest used layer were pruned
    assert plain_calls == {"vit": [1] * used, "llm": [1] * cfg.llm.custom["num_hidden_layers"]}
    assert ckpt_calls == {k: [2] * len(v) for k, v in plain_calls.items()}  # recomputed in backward
    assert plain.keys() == ckpt.keys() and any(n.startswith("vision.") for n in plain)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)
