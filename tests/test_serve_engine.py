"""The continuous-batching engine in-process: requests that join a running batch mid-generation,
leave it at different steps, stop at stop strings or are cancelled answer as ``Predictor`` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsmall.serve.engine import Engine, QueueFull, Request

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def predictor():
    from mmsmall.config import ModelConfig, load_config
    from mmsmall.inference.predictor import Predictor
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    return Predictor(VLM(cfg, build_tokenizer(cfg.tokenizer)))


def prompts(n: int):
    rng = np.random.default_rng(1)
    sizes = [(int(rng.integers(40, 220)), int(rng.integers(40, 220))) for _ in range(n)]
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return imgs, [f"What is in part {i}{'?' * (i % 4)}" for i in range(n)]


def test_requests_joining_and_leaving_answer_as_alone(predictor):
    imgs, questions = prompts(10)
    budgets = [6 + 4 * i for i in range(10)]
    alone = [predictor.predict([im], [q], max_new_tokens=n)[0] for im, q, n in zip(imgs, questions, budgets)]
    engine = Engine(predictor, max_batch=6, max_prefill=2)
    jobs = [Request(predictor.encode(im, q), max_new_tokens=n) for im, q, n in zip(imgs, questions, budgets)]
    for job in jobs[:4]:
        engine.submit(job)
    engine.step()
    engine.step()  # two prefilled, then two more join while the first decode
    assert all(j.tokens for j in jobs[:4]) and not any(j.tokens for j in jobs[4:])
    assert len(engine.rows) == 4 - sum(j.finish_reason is not None for j in jobs[:4])  # EOS may end one
    for job in jobs[4:]:
        engine.submit(job)  # join a batch already generating
    while engine.rows or engine.waiting:
        engine.step()
    assert [engine.text(j) for j in jobs] == alone
    assert engine.max_running > 4  # later requests decoded beside earlier ones
    assert [j.finish_reason for j in jobs] == [
        "length" if len(j.tokens) == n else "stop" for j, n in zip(jobs, budgets)
    ]


def test_stop_strings_and_cancellation(predictor):
    imgs, questions = prompts(4)
    free = predictor.predict(imgs, questions, max_new_tokens=12)
    # a stop string taken from what the model says for the first prompt, so that it is hit
    stop = free[0][2:4] if len(free[0]) >= 4 else free[0][-1:]
    want = predictor.predict(imgs, questions, max_new_tokens=12, stop_strings=[stop], batch_size=1)
    engine = Engine(predictor, max_batch=4)
    jobs = [
        Request(predictor.encode(im, q), max_new_tokens=12, stop=(stop,)) for im, q in zip(imgs, questions)
    ]
    assert [engine.text(j) for j in engine.generate(jobs)] == want
    assert jobs[0].finish_reason == "stop" and want[0] == free[0][: free[0].index(stop)].strip()

    long = [
        Request(predictor.encode(im, q), max_new_tokens=40, ignore_eos=True) for im, q in zip(imgs, questions)
    ]
    for job in long:
        engine.submit(job)
    engine.step()
    long[1].cancelled = True  # a client that went away
    engine.step()
    assert long[1].finish_reason == "cancelled" and long[1] not in engine.rows and len(engine.rows) == 3
    while engine.rows:
        engine.step()
    assert [len(j.tokens) for j in long if j is not long[1]] == [40, 40, 40]


def test_queue_bound_and_seeded_sampling(predictor):
    imgs, questions = prompts(2)
    engine = Engine(predictor, max_batch=2, max_queue=2)
    ex = predictor.encode(imgs[0], questions[0])
    engine.submit(Request(ex))
    engine.submit(Request(ex))
    with pytest.raises(QueueFull, match="2 requests are already waiting.*retry later"):
        engine.submit(Request(ex))
    while engine.rows or engine.waiting:
        engine.step()

    def sample(seed):
        job = Request(ex, max_new_tokens=10, do_sample=True, temperature=1.5, seed=seed, ignore_eos=True)
        return engine.generate([job])[0].tokens

    assert sample(7) == sample(7)  # the same seed, the same tokens
    assert len({tuple(sample(s)) for s in range(4)}) > 1


def test_a_stock_molmo2_release_answers_as_predictor(tmp_path):
    """A ``--format molmo2`` release (its own chat template, OLMo-2 LLM, HF SigLIP tower) in bf16."""
    from mmsmall.config import ModelConfig, load_config
    from mmsmall.export import run_export
    from mmsmall.inference.predictor import Predictor
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny-molmo2.yaml", cls=ModelConfig)
    VLM(cfg, build_tokenizer(cfg.tokenizer)).save_pretrained(tmp_path / "saved")
    release = run_export(str(tmp_path / "saved"), str(tmp_path / "release"), fmt="molmo2")
    predictor = Predictor(str(release), dtype="bf16")
    assert predictor.prompt_format == "chat_template"
    imgs, questions = prompts(6)
    alone = [
        predictor.predict([im], [q], max_new_tokens=8 + i)[0]
        for i, (im, q) in enumerate(zip(imgs, questions))
    ]
    engine = Engine(predictor, max_batch=4, max_prefill=2)
    jobs = [
        Request(predictor.encode(im, q), max_new_tokens=8 + i)
        for i, (im, q) in enumerate(zip(imgs, questions))
    ]
    assert [engine.text(j) for j in engine.generate(jobs)] == alone
