"""The FLOP count behind the MFU estimate, against a hand count on the tiny model."""

from __future__ import annotations

from pathlib import Path

import torch

from mmsmall.config import ModelConfig, load_config
from mmsmall.model.vlm import VLM
from mmsmall.processing.tokenizer import build_tokenizer
from mmsmall.train.flops import FlopCounter

ROOT = Path(__file__).resolve().parent.parent


def test_step_flops_counts_matmuls_per_token_head_per_target_and_attention_per_document():
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    model = VLM(cfg, build_tokenizer(cfg.tokenizer))
    llm = model.llm
    hidden, layers = llm.config.hidden_size, llm.config.num_hidden_layers
    head = hidden * llm.config.vocab_size  # untied, bias-free LM head
    body = sum(p.numel() for n, p in llm.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)

    doc = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])  # docs of 3, 2 and 4 tokens
    labels = torch.full_like(doc, -100)
    labels[0, 2], labels[0, 4], labels[1, 3] = 5, 6, 7  # three targets
    batch = {"doc_ids": doc, "labels": labels, "pixel_values": None}

    counter = FlopCounter(model, [])
    want = 6 * (body * 9 + head * 3) + 6 * layers * hidden * (3**2 + 2**2 + 4**2) / 2
    assert counter.step_flops(batch) == want
    frozen = FlopCounter(model, ["llm"])  # no weight gradients: 4 instead of 6
    assert frozen.step_flops(batch) == want * 4 / 6
