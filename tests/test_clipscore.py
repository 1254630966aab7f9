"""CLIP scoring: batch size never changes a score; clip.threads sets the CPU threads it uses."""

from __future__ import annotations

import torch

from data_tools.clipscore import TINY_CLIP, ClipScorer
from data_tools.config import ClipConfig
from data_tools.fixtures import natural_image


def test_batched_scores_equal_batch_one_and_threads_apply():
    ims = [natural_image(s, (64, 48)) for s in range(6)]
    texts = [f"a picture of {s} shapes" for s in range(6)]
    before = torch.get_num_threads()
    try:
        cfg = dict(enabled=True, model="mmsmall-tiny-clip", custom=TINY_CLIP)
        one = ClipScorer(ClipConfig(**cfg, batch_size=1, threads=1)).score(ims, texts)
        assert torch.get_num_threads() == 1
        many = ClipScorer(ClipConfig(**cfg, batch_size=4, threads=2)).score(ims, texts)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(set(one)) > 1 and max(abs(a - b) for a, b in zip(one, many)) <= 2e-5
