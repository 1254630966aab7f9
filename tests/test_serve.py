"""``mmsmall serve``: a real server process on 127.0.0.1, talked to by the real ``openai`` client.

The request and response shapes (chat.completion, chat.completion.chunk server-sent events ending
in ``data: [DONE]``, the ``{"error": {...}}`` body, ``stream_options.include_usage``) are those the
``openai`` Python package parses (openai/openai-python, src/openai/types/chat/); talking through it
is the check that they are right.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("mmsmall", path=str(Path(sys.executable).parent)) or "mmsmall"
KEY = "test-key-123"
NAME = "tiny-served"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from mmsmall.config import ModelConfig, load_config
    from mmsmall.model.vlm import VLM
    from mmsmall.processing.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/model/tiny.yaml", cls=ModelConfig)
    return VLM(cfg, build_tokenizer(cfg.tokenizer)).save_pretrained(tmp_path_factory.mktemp("m") / "model")


class Served:
    """``mmsmall serve`` in its own process; the port it printed."""

    def __init__(self, model: Path, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [EXE, "serve", "--model", str(model), "--port", "0", *args],
            cwd=ROOT,
            env={**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("mmsmall serve:") and "http://" in line:
                self.url = line.split()[-1]  # http://127.0.0.1:PORT/v1
                break
        else:
            line = ""
        if not line:
            self.proc.kill()
            raise RuntimeError(
                "mmsmall serve did not start:\n" + "".join(self.lines) + self.proc.stdout.read()
            )
        self._drain = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._drain.start()

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def served(model_dir):
    server = Served(model_dir, "--served-model-name", NAME, "--max-image-pixels", "250000",
                    "--max-image-bytes", "400000", "--max-request-bytes", "2000000", "--max-images", "2", env={"MMSMALL_API_KEY": KEY})  # fmt: skip
    yield server
    assert server.stop() == 0, "".join(server.lines)


def png(size=(96, 72), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def flat_png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, "PNG")  # a few hundred bytes
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def message(text: str, url: str | None) -> list[dict]:
    parts = [{"type": "text", "text": text}]
    if url is not None:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": parts}]


CASES = [
    ("What is in the image?", (96, 72), 0),
    ("Read the title.", (150, 40), 1),
    ("Count the bars.", (64, 128), 2),
]


@pytest.fixture(scope="module")
def expected(model_dir, tmp_path_factory) -> list[str]:
    """What ``mmsmall chat`` answers (its function, the same call the command makes), 12 new tokens."""
    from mmsmall.inference.chat import chat

    folder = tmp_path_factory.mktemp("imgs")
    answers = []
    for question, size, seed in CASES:
        path = folder / f"{seed}.png"
        path.write_bytes(png(size, seed))
        answers.append(chat(str(model_dir), str(path), question, max_new_tokens=12))
    return answers


def test_models_lists_the_served_model(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [NAME]


def test_openai_client_gets_the_answers_chat_gives(served, expected):
    client = served.client()
    for (question, size, seed), want in zip(CASES, expected):
        out = client.chat.completions.create(
            model=NAME, messages=message(question, data_url(png(size, seed))), max_tokens=12, temperature=0
        )
        assert out.choices[0].message.content == want
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > 10


def test_streaming_chunks_add_up_to_the_same_answers(served, expected):
    client = served.client()
    for (question, size, seed), want in zip(CASES, expected):
        stream = client.chat.completions.create(
            model=NAME,
            messages=message(question, data_url(png(size, seed))),
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text == want and finish in (["stop"], ["length"])
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

    # a stop string inside the answer: the streamed text stops where the whole answer stops
    question, size, seed = CASES[0]
    kw = dict(model=NAME, messages=message(question, data_url(png(size, seed))), max_tokens=12)
    stop = expected[0][3:5]
    whole = client.chat.completions.create(**kw, stop=[stop]).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kw, stop=[stop], stream=True)
        if c.choices
    ]
    assert "".join(parts) == whole == expected[0][: expected[0].index(stop)].strip()


def test_concurrent_requests_are_batched_and_answer_as_alone(served, model_dir):
    """24 requests at once: each answers what it answers alone, and several decoded together."""
    from mmsmall.inference.predictor import Predictor

    predictor = Predictor(str(model_dir))
    jobs = [(f"Question {i}?", (40 + 7 * i, 90 - 2 * i), 10 + i, 6 + i % 9) for i in range(24)]
    alone = [
        predictor.predict([Image.open(io.BytesIO(png(size, seed)))], [q], max_new_tokens=n)[0]
        for q, size, seed, n in jobs
    ]
    client = served.client()

    def ask(job):
        q, size, seed, n = job
        out = client.chat.completions.create(
            model=NAME, messages=message(q, data_url(png(size, seed))), max_tokens=n
        )
        return out.choices[0].message.content

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == alone
    health = httpx.get(served.url.removesuffix("/v1") + "/health").json()
    assert health["max_running"] > 1, health  # requests shared decode steps


def test_several_images_are_asked_about_together(served, model_dir):
    """Two image_url parts: the answer ``Predictor`` gives for both images, in their order."""
    from mmsmall.inference.predictor import Predictor

    predictor = Predictor(str(model_dir))
    pages = [png((80, 100), 5), png((120, 60), 6)]
    question = "Which page has more red?"
    for order in (pages, pages[::-1]):
        want = predictor.predict([[Image.open(io.BytesIO(p)) for p in order]], [question], max_new_tokens=10)[
            0
        ]
        content = [{"type": "text", "text": question}]
        content += [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in order]
        out = served.client().chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": content}], max_tokens=10
        )
        assert out.choices[0].message.content == want


def test_http_image_url(served, expected, tmp_path):
    question, size, seed = CASES[1]
    (tmp_path / "chart.png").write_bytes(png(size, seed))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        out = served.client().chat.completions.create(
            model=NAME, messages=message(question, f"{base}/chart.png"), max_tokens=12
        )
        assert out.choices[0].message.content == expected[1]
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            served.client().chat.completions.create(model=NAME, messages=message("Hi", f"{base}/missing.png"))
    finally:
        httpd.shutdown()


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(served, expected):
    client = served.client()
    good = data_url(png(CASES[0][1], CASES[0][2]))
    bad = {
        "no image": (openai.BadRequestError, "no image.*image_url", dict(messages=message("Hi?", None))),
        "broken data URL": (openai.BadRequestError, "not valid base64", dict(messages=message("Hi?", "data:image/png;base64,@@@"))),
        "not a data URL": (openai.BadRequestError, "broken data URL", dict(messages=message("Hi?", "data:image/png,xyz"))),
        "not an image": (openai.BadRequestError, "not a readable image", dict(messages=message("Hi?", data_url(b"hello")))),
        "too many pixels": (openai.APIStatusError, "above the server's limit of 250000", dict(messages=message("Hi?", data_url(flat_png((600, 600)))))),
        "too many bytes": (openai.APIStatusError, "400000 byte limit", dict(messages=message("Hi?", data_url(os.urandom(500_000))))),
        "unknown model": (openai.NotFoundError, "'nope' does not exist.*tiny-served", dict(model="nope", messages=message("Hi?", good))),
        "three images": (openai.BadRequestError, "3 images in one message.*at most 2", dict(messages=[{"role": "user", "content": [*message("Hi", good)[0]["content"], *[{"type": "image_url", "image_url": {"url": good}}] * 2]}])),
        "two turns": (openai.BadRequestError, "one user message", dict(messages=[{"role": "system", "content": "Be brief."}, *message("Hi", good)])),
        "bad max_tokens": (openai.BadRequestError, "max_tokens must be an integer >= 1", dict(messages=message("Hi", good), max_tokens=0)),
    }  # fmt: skip
    statuses = {}
    for what, (error, pattern, kw) in bad.items():
        with pytest.raises(error, match=pattern) as caught:
            client.chat.completions.create(**{"model": NAME, **kw})
        statuses[what] = caught.value.status_code
    assert statuses["too many pixels"] == statuses["too many bytes"] == 413
    assert statuses["unknown model"] == 404
    assert all(400 <= s < 500 for s in statuses.values()), statuses

    auth = {"Authorization": f"Bearer {KEY}"}
    big = httpx.post(served.url + "/chat/completions", content=b"x" * 3_000_000, headers=auth)
    assert big.status_code == 413 and "2000000 byte limit" in big.json()["error"]["message"]
    raw = httpx.post(served.url + "/chat/completions", content=b"{not json", headers=auth)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        served.client(key="wrong").models.list()
    assert httpx.get(served.url + "/models").status_code == 401  # no key at all

    out = client.chat.completions.create(model=NAME, messages=message(CASES[0][0], good), max_tokens=12)
    assert out.choices[0].message.content == expected[0]  # still serving, same answer


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_place(served, stream):
    """A client that hangs up mid-answer (streaming or not): its request leaves the running batch
    long before its 900 tokens, and the server goes on."""
    import socket
    from urllib.parse import urlsplit

    body = json.dumps({"model": NAME, "messages": message("Describe.", data_url(png())), "max_tokens": 900,
                       "stream": stream, "ignore_eos": True}).encode()  # fmt: skip
    url = urlsplit(served.url)
    head = (f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    health = served.url.removesuffix("/v1") + "/health"
    deadline = time.time() + 30
    with socket.create_connection((url.hostname, url.port)) as sock:  # a client that will vanish
        sock.sendall(head.encode() + body)
        while httpx.get(health).json()["running"] == 0 and time.time() < deadline:
            time.sleep(0.01)  # until it decodes
        start = httpx.get(health).json()
        assert start["running"] == 1
    while httpx.get(health).json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    end = httpx.get(health).json()
    assert end["running"] == 0 and end["steps"] - start["steps"] < 800, (start, end)


def test_full_queue_gets_503_and_shutdown_finishes_in_flight_requests(model_dir):
    """One decoding slot and one waiting place: a third concurrent request is refused with 503.
    SIGTERM while a long answer streams: the answer finishes whole, then the process exits 0."""
    server = Served(model_dir, "--max-batch", "1", "--max-queue", "1", "--served-model-name", NAME)
    try:
        client = server.client(key="unused")
        msgs = message("Describe.", data_url(png()))
        long = dict(model=NAME, messages=msgs, max_tokens=300, extra_body={"ignore_eos": True})

        def ask(_):
            try:
                return client.chat.completions.create(**long).usage.completion_tokens
            except openai.APIStatusError as e:
                return e

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(ask, range(4)))
        refused = [r for r in results if not isinstance(r, int)]
        assert refused and all(r.status_code == 503 and "retry later" in str(r) for r in refused), results
        assert 300 in results  # the admitted ones ran whole

        stream = client.chat.completions.create(**long, stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        first = [next(chunks), next(chunks)]  # generation is under way
        server.proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        assert rest[-1].usage.completion_tokens == 300
        assert server.proc.wait(timeout=60) == 0
        assert first[0].choices[0].delta.role == "assistant"
        assert "finishing in-flight requests" in "".join(server.lines)
    finally:
        server.stop()
