"""Samples/s of the training data path at the 7B configs' image settings, 0 / 1 / 2 data workers.

The path is the trainer's own (``mmsmall.data.loader.TrainData``): shard bytes -> (workers)
image decode, 12 crops of 336 px, tokenize -> packed micro-batches. The image settings are read
from ``configs/model/molmo-7b-d.yaml`` (crop 336, max_crops 12, margins, pooling, CLIP mean/std);
``data.seq_len`` and ``micro_batch_size`` from ``configs/train/multitask-finetune.yaml``. The
tokenizer is the tiny model's (the 7B's Qwen tokenizer is a download; text is a small part of
the cost). Images are the photo-like JPEGs of ``data_tools/fixtures.natural_image`` at camera
sizes (800x600 to 1600x1200, quality 90), written to shards with the project's ShardWriter.

Each setting draws a few warm-up samples first (worker start-up is not throughput), then times
``--samples`` samples; printed beside: the trainer process's own CPU time per sample (what is
left in it once workers decode: reading shards, receiving the uint8 crops, packing, normalizing
the batch) and the CPU time of all processes per sample (trainer + workers, from /proc), whose
2-core bound ``2000 / ms`` is what the rate approaches on an idle machine (the wall rate is only
meaningful when the machine is otherwise idle: check the load average printed). Target: 2 workers >= 1.7x of 0 on 2 cores. Beside it: the rate one GPU's
7B step consumes (about 9 samples/s, issue 26), and how many data workers that needs at the
measured per-worker rate.

    OMP_NUM_THREADS=1 .venv/bin/python bench/loader.py [--samples 48]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from data_tools.fixtures import encode, natural_image  # noqa: E402
from data_tools.shards import ShardWriter  # noqa: E402
from mmsmall.config import load_config  # noqa: E402
from mmsmall.data.loader import TrainData  # noqa: E402
from mmsmall.processing.processor import Processor  # noqa: E402
from mmsmall.processing.tokenizer import build_tokenizer  # noqa: E402

NEED_7B = 9.0  # samples/s one GPU's Molmo-7B training step consumes (issue 26)
SIZES = [(800, 600), (1024, 768), (1280, 960), (1600, 1200), (768, 1024)]


def write_shards(out: Path, n: int) -> None:
    caption = "A soft coloured background with a few shapes: ellipses and rectangles in bright colours."
    with ShardWriter(out, prefix="photos", max_count=32) as w:
        for i in range(n):
            jpeg = encode(natural_image(100 + i, SIZES[i % len(SIZES)]), quality=90)
            q = [
                {"role": "user", "content": "Describe this image."},
                {"role": "assistant", "content": caption},
            ]
            w.write(f"photo_{i:05d}", jpeg, "jpg", {"id": f"p{i}", "task": "caption", "messages": q})


def overrides(shards: Path, workers: int) -> list[str]:
    image = yaml.safe_load((ROOT / "configs/model/molmo-7b-d.yaml").read_text())["image"]
    train = yaml.safe_load((ROOT / "configs/train/multitask-finetune.yaml").read_text())
    ov = [f"model.image.{k}={v}" for k, v in image.items()]
    return ov + [
        f"data.train=[{{path: {shards}}}]",
        f"data.num_workers={workers}",
        f"data.seq_len={train['data']['seq_len']}",
        f"train.micro_batch_size={train['train']['micro_batch_size']}",
    ]


def worker_cpu_s(data: TrainData) -> float:
    """CPU seconds the data worker processes have used so far (user + system, from /proc)."""
    total = 0.0
    for proc in data.pool.procs if data.pool is not None else []:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def rate(shards: Path, workers: int, n: int, warmup: int) -> tuple[float, float, float, int]:
    """(samples/s, trainer-process CPU ms per sample, all processes' CPU ms per sample, most crops
    in a batch)."""
    cfg = load_config("configs/train/tiny-pretrain.yaml", overrides(shards, workers))
    tok = build_tokenizer(cfg.model.tokenizer)
    data = TrainData(cfg, Processor(tok, cfg.model.image, max_length=cfg.data.seq_len), tok.pad_token_id)
    crops = 0
    try:
        while data.packer.accepted < warmup:
            data.next_batch()
        start, t0, c0 = data.packer.accepted, time.perf_counter(), time.process_time()
        w0 = worker_cpu_s(data)
        while data.packer.accepted - start < n:
            batch = data.next_batch()
            crops = max(crops, int(batch["pixel_values"].shape[0]))
        done, wall = data.packer.accepted - start, time.perf_counter() - t0
        own = time.process_time() - c0
        total = own + worker_cpu_s(data) - w0
        return done / wall, 1e3 * own / done, 1e3 * total / done, crops
    finally:
        data.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=48, help="samples timed per setting")
    ap.add_argument("--warmup", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "photos"
        write_shards(shards, 160)
        print(f"data path at molmo-7b-d image settings (336 px, max 12 crops), {args.samples} samples each")
        rates = {}
        for w in (0, 1, 2):
            rates[w], cpu, total, crops = rate(shards, w, args.samples, args.warmup)
            ratio = f"{rates[w] / rates[0]:5.2f}x of 0 workers" if w else " " * 19
            print(
                f"  {w} data workers  {rates[w]:8.2f} samples/s  {ratio}   CPU ms/sample: trainer "
                f"{cpu:5.1f}, all processes {total:5.1f} (2 idle cores: <= {2e3 / total:5.1f} samples/s)"
            )
    per_worker = rates[1]
    print(f"2 workers vs 0: {rates[2] / rates[0]:.2f}x (target >= 1.7x on 2 cores)")
    print(
        f"7B step needs ~{NEED_7B:.0f} samples/s per GPU: {rates[2] / NEED_7B:.2f}x of it with 2 workers here; "
        f"~{math.ceil(NEED_7B / per_worker)} workers at this machine's {per_worker:.2f} samples/s per worker"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
