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


def test_scores_equal_open_clips_own_encoders_on_the_full_context():
    """The text tower runs only up to the batch's longest text; the scores are open_clip's own
    (encode_image / encode_text on all 77 positions), texts of very different lengths included."""
    ims = [natural_image(s, (64, 48)) for s in range(4)]
    texts = ["x", "a red circle", "three blue squares on a grey table " * 4, "two dogs"]
    scorer = ClipScorer(ClipConfig(enabled=True, model="mmsmall-tiny-clip", custom=TINY_CLIP, batch_size=4))
    net, pre, tok = scorer.model, scorer.preprocess, scorer.tokenizer
    with torch.inference_mode():
        img = torch.nn.functional.normalize(net.encode_image(torch.stack([pre(im) for im in ims])), dim=-1)
        txt = torch.nn.functional.normalize(net.encode_text(tok(texts)), dim=-1)
    stock = [float(v) for v in (img * txt).sum(-1)]
    ours = scorer.score(ims, texts)
    assert len(set(ours)) == 4 and max(abs(a - b) for a, b in zip(stock, ours)) <= 2e-5
