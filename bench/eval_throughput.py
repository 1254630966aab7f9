"""Eval throughput: our runner vs a batch-1 transformers ``generate`` loop, same tiny model and data.

- data: held-out synthetic scenes (``data_tools.synth``, counting questions) written as shards;
- model: the random-init tiny VLM (configs/model/tiny.yaml), with ``bidirectional_image`` off so
  that a plain causal ``transformers`` ``generate`` computes exactly what the model computes;
- baseline: for each sample, decode the image, encode the prompt, merge image features into the
  token embeddings (``VLM.embed``) and call ``model.llm.generate(inputs_embeds=..., greedy)`` —
  the usual one-at-a-time Hugging Face evaluation loop;
- ours: ``eval.runner.evaluate`` (DataLoader workers decoding images and encoding prompts, greedy
  generation through the continuous-batching engine ``mmsmall.serve.engine`` with ``BENCH_BATCH``
  prompts in flight, per-sample cache writes).

Answers are checked identical, then samples/s of both and the ratio are printed (target >= 8x).
Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/eval_throughput.py`` (well under 3 minutes on CPU).
Env: ``BENCH_N`` samples (default 128), ``BENCH_BATCH`` (32), ``BENCH_TOKENS`` new tokens (32, the
DocVQA/InfoVQA budget; the random model always uses all of them). On a loaded shared CPU the two
timings move with the load, so compare the ratio, and rerun when other jobs are busy.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data_tools.synth import generate  # noqa: E402
from eval.runner import evaluate  # noqa: E402
from eval.tasks import get_task  # noqa: E402
from mmsmall.config import ModelConfig, load_config  # noqa: E402
from mmsmall.inference.predictor import Predictor  # noqa: E402
from mmsmall.model.vlm import VLM  # noqa: E402
from mmsmall.processing.processor import collate  # noqa: E402
from mmsmall.processing.tokenizer import build_tokenizer  # noqa: E402

N = int(os.environ.get("BENCH_N", "128"))
BATCH = int(os.environ.get("BENCH_BATCH", "32"))
TOKENS = int(os.environ.get("BENCH_TOKENS", "32"))
TASK = "synth_scenes_count"


@torch.no_grad()
def hf_loop(predictor: Predictor, records, prompts: list[str], max_new_tokens: int) -> list[str]:
    """One sample at a time: decode, encode, embed, ``transformers`` greedy ``generate``."""
    model, tok = predictor.model, predictor.tokenizer
    out = []
    for rec, prompt in zip(records, prompts):
        image = rec.load_image()
        ex = predictor.processor.encode_prompt(image, prompt)
        batch = collate([ex], tok.pad_token_id, left_pad=True)
        ids = batch["input_ids"].to(model.device)  # (1, T)
        pv = batch.get("pixel_values")
        pool = batch.get("image_token_pooling")
        embeds = model.embed(ids, None if pv is None else pv.to(model.device), pool)  # (1, T, H)
        gen = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )  # (1, new) — with inputs_embeds only the new tokens come back
        out.append(tok.decode(gen[0], skip_special_tokens=True).strip())
    return out


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["bidirectional_image=false"], cls=ModelConfig)
    tok = build_tokenizer(cfg.tokenizer)
    predictor = Predictor(VLM(cfg, tok), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "scenes"
        generate("scenes", N, seed=123, out=shards, split="test", shard_size=1000, question_types=["count"])
        records = get_task(TASK).load(str(shards), N)
        n = len(records)
        prompts = [get_task(TASK).prompt(r, False) for r in records]

        # warm-up both paths once (allocator, kernels, lazy imports) on a few samples
        hf_loop(predictor, records[:2], prompts[:2], TOKENS)
        evaluate(predictor, [TASK], Path(tmp) / "warm", batch_size=BATCH, limit=BATCH, data={TASK: str(shards)},
                 max_new_tokens=TOKENS, num_workers=2, show_progress=False)  # fmt: skip

        t0 = time.perf_counter()
        baseline = hf_loop(predictor, records, prompts, TOKENS)
        t_base = time.perf_counter() - t0

        t0 = time.perf_counter()
        evaluate(predictor, [TASK], Path(tmp) / "ours", batch_size=BATCH, limit=N, data={TASK: str(shards)},
                 max_new_tokens=TOKENS, num_workers=2, show_progress=False)  # fmt: skip
        t_ours = time.perf_counter() - t0
        ours = {
            json.loads(line)["id"]: json.loads(line)["response"]
            for line in (Path(tmp) / "ours" / "predictions" / f"{TASK}.jsonl").read_text().splitlines()
        }
    ours_list = [ours[r.id] for r in records]
    same = sum(a == b for a, b in zip(ours_list, baseline))
    print(f"device: {device}; samples: {n}; new tokens: {TOKENS}; runner batch size: {BATCH}")
    print(f"batch-1 transformers generate loop : {n / t_base:8.2f} samples/s ({t_base:.1f} s)")
    print(f"eval runner (engine, workers)      : {n / t_ours:8.2f} samples/s ({t_ours:.1f} s)")
    print(f"speed-up: {t_base / t_ours:.2f}x (target >= 8x)")
    print(f"identical answers: {same}/{n}")
    if same != n:
        bad = next(i for i, (a, b) in enumerate(zip(ours_list, baseline)) if a != b)
        print(
            f"first difference, sample {records[bad].id}: runner {ours_list[bad]!r} vs loop {baseline[bad]!r}"
        )
        raise SystemExit(1)


if __name__ == "__main__":
    main()
