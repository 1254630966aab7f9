"""Real-width smoke: a Molmo-7B-D-shaped model, cut to a few layers, trains one ZeRO-3 step on 2
CPU processes; each rank's peak memory is set beside ``mmsmall plan``'s figure for the same run.

The widths are the 7B config's (configs/model/molmo-7b-d.yaml): Qwen2.5-7B's hidden size 3584,
MLP 18944, 28 query / 4 key-value heads and its untied 152,064-token embedding and LM head; the
ViT-L/14-336 tower's width 1024, 16 heads, MLP 4096 at 336 px; the connector at the LLM's MLP
width. Only the depths are cut: ``--llm-layers`` decoder layers (default 1) and ``--vit-layers``
blocks (default 2). Random init, no download.

What runs is the user's path: ``launch/train.sh`` with NPROC=2 (DeepSpeed's launcher, gloo),
``configs/deepspeed/zero3.json`` (the model built partitioned under ``zero.Init``), one optimizer
step on synthesized 336 px scenes, and the final save, which gathers the full weights into
``model.safetensors`` on rank 0.

Two choices keep it inside a 2-core, 24 GiB machine, and the printout says so:
- fp32, not bf16: this CPU has no AVX-512 BF16, so a bf16 matmul runs ~150x slower than fp32
  (0.2 vs 35 GFLOP/s measured on one core); bf16 is the GPU's half of this check;
- the LLM is frozen (``train.freeze=[llm]``, a connector/ViT stage as in LLaVA-style stage 1):
  training the 1.1 B embedding and head parameters too needs 16 bytes each in fp32 with Adam,
  about 21 GB over the two ranks. Gradients still flow through the LLM to the connector;
- ``stage3_max_live_parameters`` / ``stage3_max_reuse_distance`` at 1e8 (``--max-live``) instead
  of zero3.json's 1e9: with 1e9 each rank keeps up to 1e9 gathered elements alive (4 GB in fp32:
  the embedding, the layer and the LM head at once), and the two ranks went past this machine's
  memory (measured: 10 GB per rank mid-step, then the kernel's OOM kill).

Measured per rank: the peak resident set (psutil, polled every 50 ms) over the whole run, and
rank 0's ``peak_mem_gib`` logged at the step (the same counter before the final save). The
process's own footprint (Python, torch, DeepSpeed, transformers imported, nothing built) is
measured separately and subtracted, since the plan counts tensors only.

Run: ``.venv/bin/python bench/real_width.py`` (about 2-4 minutes, ~12 GB of memory at peak).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmsmall.config import load_config  # noqa: E402
from mmsmall.resources import CONFIGS_DIR, LAUNCHER, launcher_env  # noqa: E402

GIB = 2**30


def model_yaml(llm_layers: int, vit_layers: int) -> str:
    return f"""\
vision:
  backend: open_clip
  name: real-width-vit-l-14-336
  pretrained: null
  custom:
    embed_dim: 768
    vision_cfg: {{image_size: 336, layers: {vit_layers}, width: 1024, head_width: 64, patch_size: 14, mlp_ratio: 4.0}}
    text_cfg: {{context_length: 16, vocab_size: 64, width: 32, heads: 2, layers: 1}}
  layers: [-1, -{vit_layers}]
connector:
  pool_heads: 0
  mlp_hidden: 0
  pad_embed: false
llm:
  attn_implementation: sdpa_docwise
  custom:
    model_type: qwen2
    hidden_size: 3584
    intermediate_size: 18944
    num_hidden_layers: {llm_layers}
    num_attention_heads: 28
    num_key_value_heads: 4
    vocab_size: 152064
    max_position_embeddings: 4096
    tie_word_embeddings: false
tokenizer:
  name: null
  tiny_vocab_size: 384
image:
  crop_size: 336
  patch_size: 14
  max_crops: 2
  max_crops_eval: 2
  overlap_margins: [4, 4]
  pooling_size: [2, 2]
"""


def _rss_peaks(root: psutil.Process, stop: threading.Event, peaks: dict) -> None:
    """Peak RSS of every rank (a process running mmsmall.train) under ``root``, until ``stop``."""
    while not stop.is_set():
        try:
            procs = root.children(recursive=True)
        except psutil.Error:
            break
        for p in procs:
            try:
                args = p.cmdline()
                if any(a == "-m" and b == "mmsmall.train" for a, b in zip(args, args[1:])):  # a rank
                    peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                continue
        time.sleep(0.05)


def import_footprint() -> float:
    """RSS of a process that imported what a rank imports and built nothing."""
    code = (
        "import resource, deepspeed, transformers, open_clip, mmsmall.train.loop;"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm-layers", type=int, default=1)
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument(
        "--max-live",
        type=float,
        default=1e8,
        help="stage3_max_live_parameters and stage3_max_reuse_distance (zero3.json: 1e9)",
    )
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="real_width_"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "model.yaml").write_text(model_yaml(args.llm_layers, args.vit_layers))

    from data_tools.synth import generate

    shards = work / "scenes"
    if not (shards / "manifest.json").exists():
        generate("scenes", n=8, seed=0, out=shards, image_size=336, max_objects=4,
                 question_types=["count", "point"])  # fmt: skip
    overrides = [
        f"model={work / 'model.yaml'}",
        f"out_dir={work / 'run'}",
        f"data.train=[{{path: {shards}}}]",
        "data.seq_len=1024",
        "data.pack=false",
        "data.max_conversations=1",
        "train.steps=1",
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        "train.precision=fp32",
        "train.freeze=[llm]",
        f"train.deepspeed={CONFIGS_DIR / 'deepspeed/zero3.json'}",
        "train.save_every=0",
        "train.tensorboard=false",
        "train.log_every=1",
    ]
    ds = json.loads((CONFIGS_DIR / "deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage3_max_live_parameters"] = int(args.max_live)
    ds["zero_optimization"]["stage3_max_reuse_distance"] = int(args.max_live)
    (work / "zero3.json").write_text(json.dumps(ds, indent=2))
    overrides = [
        o if not o.startswith("train.deepspeed=") else f"train.deepspeed={work / 'zero3.json'}"
        for o in overrides
    ]
    config = CONFIGS_DIR / "train/tiny-finetune.yaml"
    cfg = load_config(config, overrides)

    from mmsmall.train.plan import model_shape, plan, report

    shape = model_shape(cfg)
    planned = plan(cfg, gpus=2, gpu_mem_gib=80, shape=shape, scores_saved=True)  # CPU keeps attention scores
    print(report(planned), flush=True)

    base = import_footprint()
    env = launcher_env(dict(os.environ, NPROC="2", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    t0 = time.time()
    proc = psutil.Popen(["bash", str(LAUNCHER), str(config), *overrides], env=env,
                        stdout=open(work / "train.log", "w"), stderr=subprocess.STDOUT)  # fmt: skip
    peaks: dict[int, int] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_rss_peaks, args=(proc, stop, peaks), daemon=True)
    watcher.start()
    code = proc.wait()
    stop.set()
    watcher.join()
    wall = time.time() - t0
    if code != 0:
        print((work / "train.log").read_text()[-4000:])
        print(f"training failed (exit {code}); log: {work / 'train.log'}")
        return 1
    rows = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    step = rows[-1]
    per_rank = sorted(peaks.values(), reverse=True)
    plan_gib = planned.total / GIB
    print(f"\nreal-width smoke: {shape.total:,} parameters ({shape.trainable:,} trainable), "
          f"ZeRO-3, 2 CPU processes, fp32, 1 step in {step['step_time_s']:.1f} s (run {wall:.0f} s)")  # fmt: skip
    print(f"loss {step['loss']:.3f} on {step['n_targets']} targets; {work / 'run' / 'model'} written")
    print(f"process footprint without a model: {base / GIB:.2f} GiB")
    print(f"{'':34}{'measured':>10}{'minus footprint':>17}{'plan':>8}{'ratio':>8}")
    at_step = step["peak_mem_gib"]
    print(f"{'rank 0 peak at the step':34}{at_step:>9.2f}G{at_step - base / GIB:>16.2f}G"
          f"{plan_gib:>7.2f}G{(at_step - base / GIB) / plan_gib:>8.2f}")  # fmt: skip
    for i, rss in enumerate(per_rank):
        print(f"{f'rank peak #{i + 1}, whole run (with save)':34}{rss / GIB:>9.2f}G"
              f"{(rss - base) / GIB:>16.2f}G{plan_gib:>7.2f}G{(rss - base) / GIB / plan_gib:>8.2f}")  # fmt: skip
    print("the whole-run peak includes gathering the full weights for model.safetensors on one rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
