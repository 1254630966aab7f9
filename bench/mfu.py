"""Training throughput and MFU of a ~1B-LLM VLM on one GPU, through the real DeepSpeed path.

Model: a random-init ViT-L/14-336 tower (open_clip, no download) + Molmo connector + a
Llama-style ~1B LLM (hidden 2048, 16 layers, GQA 16/4, SwiGLU 5632). Data: packed rows of
4096 tokens built by the Processor from random images (1-9 crops) and random answers.
Engine: ZeRO-2, bf16, fp32 gradient reduction, activation checkpointing off. The tokenizer is
the tiny test BPE (384 ids), so embeddings and LM head are negligible; N counts dense weights.

MFU = model FLOPs of the useful (non-pad) tokens per second / the GPU's dense bf16 peak, with
model FLOPs from mmsmall.train.flops (6N + causal attention per packed document + ViT).
Target >= 45% (anchors: torchtitan Llama-3-8B on H100 33-41%, LLaVA-OneVision-1.5 45%).
Without a GPU it says so and exits 0; ``MFU_SMOKE=1`` runs the same path with the tiny model on
CPU (2 steps) to check the script itself.
Run: ``.venv/bin/python bench/mfu.py``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOKE = os.environ.get("MFU_SMOKE") == "1"
LLM_1B = (
    "{model_type: llama, hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 16, "
    "num_attention_heads: 16, num_key_value_heads: 4, max_position_embeddings: 8192, "
    "tie_word_embeddings: false}"
)
OVERRIDES_1B = [
    "model.vision.name=ViT-L-14-336",
    "model.vision.custom=null",
    "model.vision.layers=[-3, -10]",
    f"model.llm.custom={LLM_1B}",
    "model.connector.pool_heads=0",
    "model.connector.mlp_hidden=0",
    "model.image.crop_size=336",
    "model.image.max_crops=8",
    "model.image.overlap_margins=[4, 4]",
    "model.image.mean=[0.48145466, 0.4578275, 0.40821073]",
    "model.image.std=[0.26862954, 0.26130258, 0.27577711]",
    "data.seq_len=4096",
    "train.micro_batch_size=2",
    "train.precision=bf16",
]


def main() -> int:
    if not torch.cuda.is_available() and not SMOKE:
        print("bench/mfu.py needs a CUDA GPU (none visible); skipped. MFU_SMOKE=1 checks the script on CPU.")
        return 0
    if SMOKE:
        os.environ["DS_ACCELERATOR"] = "cpu"
    from mmsmall.config import load_config
    from mmsmall.data.packing import Packer
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.processor import Processor
    from mmsmall.processing.tokenizer import build_tokenizer
    from mmsmall.train.engine import build_engine, init_distributed
    from mmsmall.train.flops import FlopCounter, peak_flops
    from mmsmall.train.loop import train_step

    overrides = ["data.train=[]", "train.grad_accum=1", "train.deepspeed=configs/deepspeed/zero2.json"]
    overrides += [] if SMOKE else OVERRIDES_1B
    cfg = load_config(ROOT / "configs/train/tiny-pretrain.yaml", overrides)
    _, world = init_distributed()
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model.tokenizer)
    model = VLM(cfg.model, tok)
    n_llm = sum(p.numel() for p in model.llm.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    engine = build_engine(cfg, model, world)
    counter, peak = FlopCounter(model, []), peak_flops()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32

    processor = Processor(tok, cfg.model.image)
    rng = np.random.default_rng(0)
    words = "the a chart shows value of bars line red blue year total count point".split()

    def pull() -> dict:
        w, h = (int(x) for x in rng.choice([224, 336, 500, 700, 1000], size=2))
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        answer = " ".join(rng.choice(words, size=int(rng.integers(5, 300))))
        conv = [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": answer}]
        return processor.encode(image, [conv], train=True) | {"sample_id": "x"}

    packer = Packer(cfg.data.seq_len, cfg.train.micro_batch_size, tok.pad_token_id)
    n_warm, n_steps = (1, 2) if SMOKE else (3, 10)
    batches = [packer.next_batch(pull) for _ in range(n_warm + n_steps)]
    for b in batches[:n_warm]:
        train_step(engine, [b], world, dtype, 0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in batches[n_warm:]:
        train_step(engine, [b], world, dtype, 0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    useful = sum(int(b["attention_mask"].sum()) for b in batches[n_warm:])
    flops = sum(counter.step_flops(b) for b in batches[n_warm:])
    pad = 1 - useful / sum(b["attention_mask"].numel() for b in batches[n_warm:])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke)"
    print(
        f"device {device}; params: LLM {n_llm / 1e9:.2f} B, total {n_all / 1e9:.2f} B; pad {100 * pad:.1f}%"
    )
    print(f"useful tokens/s {useful / dt:,.0f}; model TFLOP/s {flops / dt / 1e12:.1f}")
    if peak is None:
        print("MFU: n/a (unknown device peak)")
    else:
        print(f"MFU {100 * flops / dt / peak:.1f}%  (peak {peak / 1e12:.0f} TFLOP/s bf16; target >= 45%)")
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
