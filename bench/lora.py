"""LoRA vs full fine-tuning: trainable parameters, AdamW state memory and step time (CPU).

Two model settings, each fine-tuned both ways from the same initial weights on the same batch:
the tiny Molmo2-mappable config (configs/model/tiny-molmo2.yaml) and the same with a 512-wide,
4-layer LLM, whose step is dominated by the LLM's linear layers as a 7B model's is. LoRA is peft's
(``mmsmall.model.lora.apply_lora``: rank 16 on every LLM projection, connector trained fully, the
rest frozen); full fine-tuning trains everything. A forward + backward + AdamW step is timed, the
two modes alternating step by step so load from other processes hits both alike. Optimizer state
is measured from AdamW's tensors after the first step.
Last, the same arithmetic for a 7B LLM (OLMo-2-7B shape, LoRA rank 32 as in
configs/train/lora-finetune.yaml) from its dimensions alone.
Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/lora.py`` (about a minute).
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

from mmsmall.config import LoRAConfig, LoRAModuleConfig, ModelConfig, load_config  # noqa: E402
from mmsmall.model.lora import apply_lora  # noqa: E402
from mmsmall.model.vlm import VLM  # noqa: E402
from mmsmall.processing.processor import Processor, collate  # noqa: E402
from mmsmall.processing.tokenizer import build_tokenizer  # noqa: E402

STEPS = int(os.environ.get("BENCH_STEPS", "6"))
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WIDE = (
    "llm.custom={model_type: olmo2, hidden_size: 512, intermediate_size: 1536, num_hidden_layers: 4, "
    "num_attention_heads: 8, num_key_value_heads: 8, max_position_embeddings: 2048, rms_norm_eps: 1.0e-6, "
    "tie_word_embeddings: false}"
)


def _batch(processor: Processor) -> dict:
    rng = np.random.default_rng(0)
    examples = []
    for i in range(4):
        img = Image.fromarray((rng.random((120 + 20 * i, 160, 3)) * 255).astype(np.uint8))
        conv = [{"role": "user", "content": "Describe this image."},
                {"role": "assistant", "content": "A chart with red bars and a blue line. " * 3}]  # fmt: skip
        examples.append(processor.encode(img, [conv]))
    return collate(examples, processor.tokenizer.pad_token_id)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    )


def _measure(overrides: list[str], label: str) -> None:
    cfg = load_config(
        Path(__file__).resolve().parent.parent / "configs/model/tiny-molmo2.yaml", overrides, cls=ModelConfig
    )
    tok = build_tokenizer(cfg.tokenizer)
    torch.manual_seed(0)
    full = VLM(cfg, tok).train()
    lora = copy.deepcopy(full)
    apply_lora(lora, LoRAConfig(enabled=True, llm=LoRAModuleConfig(rank=16, alpha=32.0, target_modules=PROJ)))
    batch = {k: v for k, v in _batch(Processor(tok, cfg.image)).items() if k != "sample_ids"}
    runs = {}
    for name, model in (("full", full), ("lora", lora)):
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = {
            "model": model,
            "params": params,
            "opt": torch.optim.AdamW(params, lr=1e-4),
            "times": [],
        }
    for step in range(STEPS + 1):  # step 0 warms up (allocations, kernels) and is not timed
        for r in runs.values():
            t0 = time.perf_counter()
            loss = r["model"](**batch).loss
            loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            if step:
                r["times"].append(time.perf_counter() - t0)
    total = sum(p.numel() for p in full.parameters())
    print(f"\n{label}: {total:,} parameters, batch of 4 images ({int(batch['attention_mask'].sum())} tokens)")
    print(f"| mode | trainable params | AdamW state (MB) | step time (s, median of {STEPS}) |")
    print("|------|-----------------:|-----------------:|-----------------:|")
    for name, r in runs.items():
        n = sum(p.numel() for p in r["params"])
        print(
            f"| {name} | {n:,} ({100 * n / total:.1f}%) | {_state_bytes(r['opt']) / 2**20:.2f} | {np.median(r['times']):.3f} |"
        )
    f, lo = runs["full"], runs["lora"]
    print(f"ratios full/lora: optimizer state {_state_bytes(f['opt']) / _state_bytes(lo['opt']):.1f}x, "
          f"step time {np.median(f['times']) / np.median(lo['times']):.2f}x")  # fmt: skip


def _seven_b() -> None:
    h, inter, layers, vocab, r = 4096, 11008, 32, 100_352, 32  # OLMo-2-7B's shape; LoRA rank 32
    per_layer = 4 * h * h + 3 * h * inter
    base = layers * per_layer + 2 * vocab * h
    lora = layers * r * (4 * (h + h) + 2 * (h + inter) + (inter + h))
    connector = 2 * 1152 * 1152 * 2 + 3 * 1152 * 2 * 18944 // 2  # pooling attention + SwiGLU, roughly
    print(
        "\n7B LLM (OLMo-2-7B shape, LoRA rank 32 on 7 projections), AdamW fp32 states (+ fp32 master for bf16):"
    )
    for name, n in (("full", base + connector), ("lora", lora + connector)):
        print(f"  {name}: {n / 1e6:,.0f} M trainable, optimizer state + master {n * 12 / 2**30:,.1f} GiB")
    print(f"  bf16 base weights held either way: {base * 2 / 2**30:.1f} GiB")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    _measure([], "tiny (configs/model/tiny-molmo2.yaml)")
    _measure([WIDE], "wide (512-wide, 4-layer OLMo-2 LLM)")
    _seven_b()
