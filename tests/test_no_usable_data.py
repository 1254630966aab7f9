"""Training data in which every sample is skipped stops with the reasons, instead of looping forever."""

from __future__ import annotations

import pytest
from test_train import shards  # noqa: F401 - the module's shard fixture


def test_every_sample_too_long_stops_with_counts(shards):  # noqa: F811
    from mmsmall.config import load_config
    from mmsmall.data.loader import NoUsableData, TrainData
    from mmsmall.processing.processor import Processor
    from mmsmall.processing.tokenizer import build_tokenizer

    cfg = load_config(
        "configs/train/tiny-pretrain.yaml", [f"data.train=[{{path: {shards}}}]", "data.seq_len=16"]
    )
    tok = build_tokenizer(cfg.model.tokenizer)
    data = TrainData(cfg, Processor(tok, cfg.model.image, max_length=16), tok.pad_token_id)
    with pytest.raises(NoUsableData, match=r"whole pass over data.train.*too_long"):
        data.next_batch()
    skipped = data.counters
    assert (
        skipped.get("too_long", 0) + skipped.get("encode_error", 0) >= 47
    )  # at least one full pass (47 good samples)
