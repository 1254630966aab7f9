"""Useful tokens per second, packed vs padded, on a realistic length mix (tiny model, CPU).

The mix imitates a Molmo fine-tuning mixture: images of many sizes and aspect ratios (1 to
``max_crops`` + 1 views, so the image prefix varies several-fold) with short answers
(pointing, counting, VQA: a few tokens), medium ones (chart / doc QA) and long dense captions.
The same examples go through both layouts with the same model and optimizer settings:

- padded: ``ROWS_PADDED`` examples per batch, padded to the longest of the batch;
- packed: ``ROWS_PACKED`` rows of ``SEQ_LEN`` tokens filled best-fit (mmsmall.data.packing).

"Useful" tokens are the non-pad ones; a forward + backward + AdamW step is timed per batch.
Targets: pad fraction <= 5% packed, ratio >= 1.5x.
Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/packing.py`` (about 1-2 minutes).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmsmall.processing.processor import Processor  # noqa: E402

from mmsmall.config import load_config  # noqa: E402
from mmsmall.data.packing import Packer  # noqa: E402
from mmsmall.model.vlm import build_vlm  # noqa: E402
from mmsmall.processing.tokenizer import build_tokenizer  # noqa: E402

N_EXAMPLES = int(os.environ.get("BENCH_N", "96"))
SEQ_LEN, ROWS_PACKED, ROWS_PADDED = 1024, 2, 6
WORDS = "the a chart shows value of bars line red blue green year total count point mug person".split()


def make_examples(processor: Processor, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (int(x) for x in rng.choice([64, 112, 180, 260, 400], size=2))
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        kind = rng.choice(["short", "medium", "caption"], p=[0.45, 0.35, 0.2])
        n_words = {
            "short": rng.integers(1, 4),
            "medium": rng.integers(5, 25),
            "caption": rng.integers(40, 160),
        }[kind]
        answer = " ".join(rng.choice(WORDS, size=n_words))
        conv = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": answer}]
        ex = processor.encode(image, [conv], train=True)
        ex["sample_id"] = f"b{i}"
        out.append(ex)
    return out


def run(model, examples: list[dict], packer: Packer) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = iter(examples)
    useful = padded = batches = 0
    elapsed = 0.0
    while True:
        try:
            batch = packer.next_batch(lambda: next(it))
        except StopIteration:
            break
        t0 = time.perf_counter()
        out = model(**batch, loss_reduction="mean")
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - t0
        useful += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
        batches += 1
    return {"tokens_per_s": useful / elapsed, "pad": 1 - useful / padded, "batches": batches, "s": elapsed}


def main() -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = load_config(
        Path(__file__).resolve().parent.parent / "configs/train/tiny-pretrain.yaml", ["data.train=[]"]
    )
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model.tokenizer)
    processor = Processor(tok, cfg.model.image)
    examples = make_examples(processor, N_EXAMPLES)
    lengths = np.array([len(e["input_ids"]) for e in examples])
    print(
        f"{N_EXAMPLES} examples, tokens per example: min {lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()}"
    )
    results = {}
    for name, packer in [
        ("padded", Packer(SEQ_LEN, ROWS_PADDED, tok.pad_token_id, pack=False)),
        ("packed", Packer(SEQ_LEN, ROWS_PACKED, tok.pad_token_id, pack=True)),
    ]:
        torch.manual_seed(0)
        model = build_vlm(cfg.model, tok).train()
        run(model, examples[:8], Packer(SEQ_LEN, 2, tok.pad_token_id, pack=name == "packed"))  # warm-up
        results[name] = r = run(model, examples, packer)
        print(
            f"{name:7s} useful tokens/s {r['tokens_per_s']:9.0f}   pad fraction {100 * r['pad']:5.1f}%   {r['batches']} batches in {r['s']:.1f} s"
        )
    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"packed / padded useful tokens/s: {ratio:.2f}x   (targets: packed pad <= 5%, ratio >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
