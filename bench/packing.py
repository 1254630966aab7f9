"""Useful tokens per second, packed vs padded, on a realistic length mix (tiny model, CPU).

The mix imitates a Molmo fine-tuning mixture: images of many sizes and aspect ratios (1 to
``max_crops`` + 1 views, so the image prefix varies several-fold) with short answers
(pointing, counting, VQA: a few tokens), medium ones (chart / doc QA) and long dense captions.
The same examples go through both layouts with the same model and optimizer settings:

- padded: ``ROWS_PADDED`` examples per batch, padded to the longest of the batch;
- packed: ``ROWS_PACKED`` rows of ``SEQ_LEN`` tokens filled best-fit (mmsmall.data.packing).

"Useful" tokens are the non-pad ones; a forward + backward + AdamW step is timed per batch, the
two layouts alternating batch by batch (each on its own copy of the same initial model) so that
load from other processes hits both alike; CPU-seconds are printed beside wall time for the
same reason.
Two model settings are measured: the tiny config as it is, where the vision tower (the same
cost in both layouts) and the (T, T) attention of a 64-wide LLM dominate a step, and the same
with a 512-wide LLM, whose step is dominated by the LLM's linear layers as a 7B model's is (an
LLM is ~90% of a Molmo-7B step), which is where packing's saved padding turns into time.
Targets: pad fraction <= 5% packed, ratio >= 1.5x.
Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/packing.py`` (about 1-2 minutes).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmsmall.config import load_config  # noqa: E402
from mmsmall.data.packing import Packer  # noqa: E402
from mmsmall.model.attention import DOCWISE  # noqa: E402
from mmsmall.model.vlm import VLM  # noqa: E402
from mmsmall.processing.processor import Processor  # noqa: E402
from mmsmall.processing.tokenizer import build_tokenizer  # noqa: E402

N_EXAMPLES = int(os.environ.get("BENCH_N", "96"))
SEQ_LEN, ROWS_PACKED, ROWS_PADDED = 768, 3, 6
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


def batches_of(examples: list[dict], packer: Packer) -> list[dict]:
    it = iter(examples)
    out = []
    while True:
        try:
            out.append(packer.next_batch(lambda: next(it)))
        except StopIteration:  # the examples ran out mid-batch: that batch is dropped
            return out


class Trainer:
    """Forward + backward + AdamW on one model copy; accumulates useful tokens and times."""

    def __init__(self, model):
        self.model, self.opt = model, torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.useful = self.slots = 0
        self.wall = self.cpu = self.vision_cpu = 0.0

    def vision_part(self, batch: dict) -> None:
        """CPU-seconds of the vision tower + connector alone (forward + backward) on the batch's images:
        the same work in every layout, which no packing can save."""
        c0 = time.process_time()
        feats = self.model.image_features(batch["pixel_values"], batch["image_token_pooling"])
        feats.float().square().mean().backward()
        self.model.zero_grad(set_to_none=True)
        self.vision_cpu += time.process_time() - c0

    def step(self, batch: dict, record: bool = True) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        self.model(**batch, loss_reduction="mean", keep_logits=False).loss.backward()  # as the loop
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if record:
            self.wall += time.perf_counter() - w0
            self.cpu += time.process_time() - c0
            self.useful += int(batch["attention_mask"].sum())
            self.slots += batch["attention_mask"].numel()


WIDE_LLM = {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 4}


def main() -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = load_config(
        Path(__file__).resolve().parent.parent / "configs/train/tiny-pretrain.yaml", ["data.train=[]"]
    )
    for label, llm_overrides in (("tiny config", {}), ("tiny config, 512-wide LLM", WIDE_LLM)):
        print(f"--- {label}")
        cfg.model.llm.custom = {**cfg.model.llm.custom, **llm_overrides}
        run(cfg)
    return 0


# (name, packed?, attention): a padded batch as transformers runs it (one SDPA call over the
# padded rows) is the baseline; the docwise rows show how much of the gain is attention that
# skips padding / other documents and how much is the linear layers' saved padding.
LAYOUTS = (
    ("padded", False, "sdpa"),
    ("padded+docwise", False, DOCWISE),
    ("packed", True, "sdpa"),
    ("packed+docwise", True, DOCWISE),
)


def run(cfg) -> None:
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model.tokenizer)
    processor = Processor(tok, cfg.model.image)
    t0 = time.perf_counter()
    examples = make_examples(processor, N_EXAMPLES)
    lengths = np.array([len(e["input_ids"]) for e in examples])
    print(
        f"{N_EXAMPLES} examples encoded in {time.perf_counter() - t0:.1f} s; tokens per example: "
        f"min {lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()}"
    )
    batches = {
        False: batches_of(examples, Packer(SEQ_LEN, ROWS_PADDED, tok.pad_token_id, pack=False)),
        True: batches_of(examples, Packer(SEQ_LEN, ROWS_PACKED, tok.pad_token_id, pack=True)),
    }
    trainers = {}
    for name, pack, attn in LAYOUTS:
        torch.manual_seed(0)
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.llm.attn_implementation = attn
        trainers[name] = Trainer(VLM(model_cfg, tok).train())
        trainers[name].step(batches[pack][0], record=False)  # warm-up
    # Alternate the layouts batch by batch so a busy machine slows them alike.
    for i in range(max(len(b) for b in batches.values())):
        for name, pack, _ in LAYOUTS:
            if i < len(batches[pack]):
                trainers[name].step(batches[pack][i])
                if name == "padded":
                    trainers[name].vision_part(batches[pack][i])
    base = trainers["padded"]
    for name, pack, _ in LAYOUTS:
        t = trainers[name]
        ratio_wall = (t.useful / t.wall) / (base.useful / base.wall)
        ratio_cpu = (t.useful / t.cpu) / (base.useful / base.cpu)
        print(
            f"{name:15s} useful tokens/s {t.useful / t.wall:7.0f} (wall) {t.useful / t.cpu:7.0f} (per CPU-s)  "
            f"pad {100 * (1 - t.useful / t.slots):5.1f}%  {len(batches[pack]):2d} batches  "
            f"vs padded {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x per CPU-s"
        )
    # Amdahl: packing can only remove the padded slots' share of the LLM's time; the vision tower's
    # time stays. With vision share v of a padded step and useful fraction u of its slots, the
    # best any layout can do is 1 / (v + (1 - v) * u) (attention's quadratic cost ignored).
    v = base.vision_cpu / base.cpu
    u = base.useful / base.slots
    print(
        f"padded step: vision tower + connector {100 * v:.0f}% of CPU time, {100 * u:.0f}% of slots useful; "
        f"ceiling for any packing {1 / (v + (1 - v) * u):.2f}x"
    )
    print("targets: packed pad <= 5%, packed / padded useful tokens/s >= 1.5x")


if __name__ == "__main__":
    sys.exit(main())
