"""`mmsmall serve` throughput and latency against batch-1 sequential `mmsmall chat`-style generation.

- model: the random-init tiny VLM (configs/model/tiny.yaml), saved to a temporary folder;
- requests: ``BENCH_N`` chat-completion requests (default 96), each a different random image
  (varied sizes, as PNG data URLs) and question, ``max_tokens`` ``BENCH_TOKENS`` (default 32), greedy;
- baseline: the same requests one at a time through ``Predictor.predict`` at batch 1, exactly what
  ``mmsmall chat`` runs after loading the model (decode image, encode prompt, KV-cached greedy
  generation), in this process;
- ours: ``mmsmall serve`` in its own process (``--max-batch 32``), driven over HTTP by an asyncio
  client keeping 1, 8 and 32 requests in flight.

Every server answer is checked equal to the baseline's answer for the same request. Printed:
requests/s, p50 and p99 latency per setting, the speed-up in requests/s over the baseline (run
before and after the server; the faster run is the reference; target >= 4x at concurrency 32), and
serve at 32 over serve at 1 (the batching gain alone). Both sides get ``BENCH_THREADS`` torch threads (default 1: the tiny model gains nothing from a second
thread, and two OpenMP threads on a loaded shared CPU slowed the baseline's main thread 3-7x in a
measurement here while a worker thread was hit less, which would flatter the server). The server
also decodes and encodes images in its own threads while the engine generates.
Run: ``.venv/bin/python bench/serve.py`` (about 2 minutes on a 2-core CPU). On a shared, loaded CPU
the timings move with the load: compare the ratio, and rerun when other jobs are busy.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = os.environ.get("BENCH_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmsmall.config import ModelConfig, load_config  # noqa: E402
from mmsmall.inference.predictor import Predictor  # noqa: E402
from mmsmall.model.vlm import VLM  # noqa: E402
from mmsmall.processing.tokenizer import build_tokenizer  # noqa: E402

N = int(os.environ.get("BENCH_N", "96"))
TOKENS = int(os.environ.get("BENCH_TOKENS", "32"))
CONCURRENCY = (1, 8, 32)
NAME = "bench-tiny"


def requests(n: int) -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = int(rng.integers(64, 200)), int(rng.integers(64, 200))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append((buf.getvalue(), f"What is shown in region {i}?"))
    return out


def baseline(model_dir: Path, reqs) -> tuple[list[str], list[float], float]:
    torch.set_num_threads(int(THREADS))
    predictor = Predictor(str(model_dir))
    predictor.predict([Image.open(io.BytesIO(reqs[0][0]))], [reqs[0][1]], max_new_tokens=TOKENS)  # warm-up
    answers, latencies = [], []
    t0 = time.perf_counter()
    for data, question in reqs:
        t = time.perf_counter()
        image = Image.open(io.BytesIO(data)).convert("RGB")  # chat decodes the image file each time
        answers.append(predictor.predict([image], [question], max_new_tokens=TOKENS)[0])
        latencies.append(time.perf_counter() - t)
    return answers, latencies, time.perf_counter() - t0


def start_server(model_dir: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": THREADS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsmall.cli", "serve", "--model", str(model_dir), "--port", "0",
         "--served-model-name", NAME, "--max-batch", "32", "--max-queue", "1024"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("mmsmall serve:") and "http://" in line:
            return proc, line.split()[-1]
    raise RuntimeError("mmsmall serve did not start")


async def drive(url: str, reqs, concurrency: int) -> tuple[list[str], list[float], float, list[int]]:
    import aiohttp

    bodies = [
        {
            "model": NAME,
            "max_tokens": TOKENS,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": q},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + base64.b64encode(d).decode()},
                        },
                    ],
                }
            ],
        }
        for d, q in reqs
    ]
    answers: list[str | None] = [None] * len(bodies)
    latencies = [0.0] * len(bodies)
    generated = [0] * len(bodies)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)

    async def worker(session):
        while not queue.empty():
            i = queue.get_nowait()
            t = time.perf_counter()
            async with session.post(f"{url}/chat/completions", json=bodies[i]) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body}")
            latencies[i] = time.perf_counter() - t
            answers[i] = body["choices"][0]["message"]["content"]
            generated[i] = body["usage"]["completion_tokens"]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await worker_warmup(session, url, bodies[0])
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return answers, latencies, wall, generated


async def worker_warmup(session, url, body) -> None:
    async with session.post(f"{url}/chat/completions", json=body) as resp:
        await resp.read()


def row(name: str, latencies: list[float], wall: float, base_rps: float) -> float:
    rps = len(latencies) / wall
    p50, p99 = np.percentile(latencies, 50), np.percentile(latencies, 99)
    ratio = f"{rps / base_rps:6.2f}x"
    print(f"  {name:<38} {rps:8.2f} req/s   p50 {p50 * 1000:8.1f} ms   p99 {p99 * 1000:8.1f} ms   {ratio}")
    return rps


def main() -> int:
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    reqs = requests(N)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = VLM(cfg, build_tokenizer(cfg.tokenizer)).save_pretrained(Path(tmp) / "model")
        print(
            f"tiny VLM, {N} requests (one image each), max_tokens {TOKENS}, greedy, {THREADS} torch threads"
        )
        want, lat, wall = baseline(model_dir, reqs)
        runs = [("batch-1 sequential (mmsmall chat), before", lat, wall)]
        proc, url = start_server(model_dir)
        ok = True
        try:
            for c in CONCURRENCY:
                answers, lat, wall, generated = asyncio.run(drive(url, reqs, c))
                runs.append((f"mmsmall serve, concurrency {c}", lat, wall))
                if answers != want:
                    ok = False
                    print(f"    concurrency {c}: {sum(a != b for a, b in zip(answers, want))} answers differ")
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        again, lat, wall = baseline(model_dir, reqs)
        ok &= again == want
        runs.insert(1, ("batch-1 sequential (mmsmall chat), after", lat, wall))
    # the faster of the two baseline runs is the reference (the conservative ratio on a noisy machine)
    base_rps = max(len(lat) / wall for _, lat, wall in runs[:2])
    rates = [row(name, lat, wall, base_rps) for name, lat, wall in runs]
    print(
        f"  answers identical to the baseline: {'yes' if ok else 'NO'} (mean {np.mean(generated):.1f} new tokens)"
    )
    print(f"  speed-up at concurrency 32: {rates[-1] / base_rps:.2f}x over the faster baseline run (target >= 4x), "
          f"{rates[-1] / rates[2]:.2f}x over serve at concurrency 1")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
