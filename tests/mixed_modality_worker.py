"""One rank of tests/test_mixed_modality.py: ``python mixed_modality_worker.py OUT.json``.

ZeRO-3 on the tiny model, 3 optimizer steps through the loop's ``train_step``. Step k has two
micro-batches, an image one and a text-only one: with WORLD_SIZE=2 rank 0 takes the image one and
rank 1 the text-only one (grad_accum 1); with WORLD_SIZE=1 the one process takes both (grad_accum
2), the reference. Rank 0 writes the per-step losses to OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mmsmall.config import load_config
from mmsmall.processing.processor import Processor, collate
from mmsmall.train.engine import build_engine, init_distributed
from mmsmall.train.loop import seed_everything, train_step
from mmsmall.train.zero_init import build_model

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3


def micro_batches(processor: Processor, pad_id: int, step: int) -> list[dict]:
    """(image micro-batch, text-only micro-batch) of ``step``."""
    rng = np.random.default_rng(step)
    image = Image.fromarray(rng.integers(0, 255, (70 + 9 * step, 100, 3), dtype=np.uint8))
    seen = [{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": f"noise {step}"}]
    text = [{"role": "user", "content": f"Count to {step + 2}."}, {"role": "assistant", "content": "1 2 3"}]
    return [
        collate([processor.encode(image, [seen], sample_id=f"i{step}")], pad_id),
        collate([processor.encode(None, [text], sample_id=f"t{step}")], pad_id),
    ]


def main(out: str) -> None:
    rank, world = init_distributed()
    overrides = ["train.deepspeed=configs/deepspeed/zero3.json", f"train.grad_accum={3 - world}"]
    cfg = load_config(ROOT / "configs/train/tiny-pretrain.yaml", overrides)
    seed_everything(cfg.seed)
    built = build_model(cfg, world)
    engine = build_engine(cfg, built.model, world, built.ds_config)
    processor = Processor(
        built.tokenizer, cfg.model.image, cfg.model.style_prefix, max_length=cfg.data.seq_len
    )
    losses = []
    for step in range(STEPS):
        both = micro_batches(processor, built.tokenizer.pad_token_id, step)
        mine = both if world == 1 else [both[rank]]
        loss, _ = train_step(engine, mine, world, engine.module.vision.dtype, step + 1)
        losses.append(loss)
    if rank == 0:
        Path(out).write_text(json.dumps(losses))


if __name__ == "__main__":
    main(sys.argv[1])
