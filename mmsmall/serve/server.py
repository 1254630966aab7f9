"""``mmsmall serve``: an OpenAI-compatible HTTP server over the continuous-batching :class:`Engine`.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (one user message: text parts and at
most ``--max-images`` ``image_url`` parts, asked about together in their order, each a ``data:``
URL or an http(s) URL; ``stream: true`` answers in
server-sent events as OpenAI does), ``GET /health``. Errors use OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for bad requests, 401 for a
missing or wrong API key, 503 when the waiting queue is full or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from mmsmall.serve.engine import Engine, EngineClosed, QueueFull, Request

logger = logging.getLogger(__name__)

API_KEY_ENV = "MMSMALL_API_KEY"


@dataclass
class ServeOptions:
    """What ``mmsmall serve`` takes besides the model (each has a ``--flag`` of the same name)."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: the model folder's name
    api_key: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_images: int = 8  # image_url parts one request may carry (a multi-page document)
    max_image_pixels: int = 40_000_000
    max_tokens_limit: int = 1024  # the most max_tokens a request may ask for
    default_max_tokens: int = 64  # as mmsmall chat
    allow_text_only: bool = False  # requests without an image are refused unless set
    fetch_timeout: float = 20.0  # seconds for an http(s) image URL
    shutdown_timeout: float = 60.0  # seconds in-flight requests get to finish on SIGTERM / SIGINT


class APIError(Exception):
    """A request we refuse: HTTP status, OpenAI error type and code, and a message saying what to do."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> web.Response:
        kind = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(
            self.status, "invalid_request_error"
        )
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return web.json_response(body, status=self.status, headers=headers)


# ----------------------------------------------------------------------------- request parsing


@dataclass
class ChatRequest:
    text: str
    image_urls: list[str]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool


def parse_chat(body: Any, model_name: str, opts: ServeOptions) -> ChatRequest:
    """Validate a chat-completions body; raise :class:`APIError` naming the field that is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise APIError(400, "missing 'model'; GET /v1/models lists the served model", param="model")
    if model != model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
    if len(messages) != 1 or messages[0]["role"] != "user":
        roles = [m["role"] for m in messages]
        raise APIError(
            400,
            f"one user message per request is supported (got roles {roles}): the model answers one "
            "question about its images; put the question and the images in a single user message",
            param="messages",
        )
    texts, images = _parts(messages[0].get("content"))
    if len(images) > opts.max_images:
        raise APIError(
            400,
            f"{len(images)} images in one message; this server takes at most {opts.max_images} (--max-images)",
            param="messages",
        )
    if not images and not opts.allow_text_only:
        raise APIError(
            400,
            "this request has no image, and the server requires one: add an image_url part "
            "(a data: URL or an http(s) URL), or start the server with --allow-text-only",
            param="messages",
        )
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, f"n={n}: one choice per request is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = opts.default_max_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", param="max_tokens")
    if max_tokens > opts.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens={max_tokens} is above this server's limit of {opts.max_tokens_limit} "
            "(--max-tokens-limit)",
            param="max_tokens",
        )
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)  # default greedy, as mmsmall chat
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise APIError(400, f"seed must be an integer, got {seed!r}", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    stream_options = body.get("stream_options") or {}
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: a fixed answer length (benchmarks)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, f"ignore_eos must be true or false, got {ignore_eos!r}", param="ignore_eos")
    return ChatRequest(
        text="\n".join(texts),
        image_urls=images,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=tuple(stop),
        seed=seed,
        stream=stream,
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        ignore_eos=ignore_eos,
    )


def _parts(content: Any) -> tuple[list[str], list[str]]:
    """A message's content -> (texts, image URLs); a plain string is one text part."""
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise APIError(400, "message content must be a string or a list of parts", param="messages")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise APIError(400, f"content[{j}]: image_url needs a 'url'", param="messages")
            images.append(url)
        else:
            raise APIError(
                400, f"content[{j}]: unsupported part {kind!r}; valid: text, image_url", param="messages"
            )
    return texts, images


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise APIError(400, f"{key} must be a number in [{low}, {high}], got {value!r}", param=key)
    return float(value)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[<type>];base64,<payload>`` URL, or :class:`APIError` (400 / 413)."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise APIError(
            400,
            "broken data URL: expected data:<mime type>;base64,<base64 bytes> (e.g. data:image/png;base64,...)",
            param="messages",
        )
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(413, f"the image is above the server's {max_bytes} byte limit", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(
            400, f"broken data URL: its payload is not valid base64 ({e})", param="messages"
        ) from None


# ----------------------------------------------------------------------------- the app


class Server:
    """The aiohttp application around one :class:`Engine`."""

    def __init__(self, engine: Engine, model_name: str, opts: ServeOptions):
        self.engine, self.model_name, self.opts = engine, model_name, opts
        self.created = int(time.time())
        self.http: ClientSession | None = None
        self.app = web.Application(client_max_size=opts.max_request_bytes, middlewares=[self._guard])
        self.app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/v1/models", self.models),
                web.post("/v1/chat/completions", self.chat),
            ]
        )
        self.app.on_cleanup.append(self._cleanup)

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """API key check, and every refusal (ours or aiohttp's) as an OpenAI error body."""
        try:
            if self.opts.api_key and request.path != "/health":
                auth = request.headers.get("Authorization", "")
                if auth != f"Bearer {self.opts.api_key}":
                    what = "no API key" if not auth else "a wrong API key"
                    raise APIError(401, f"{what}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            return await handler(request)
        except APIError as e:
            return e.response()
        except web.HTTPRequestEntityTooLarge:
            return APIError(
                413, f"the request body is above the server's {self.opts.max_request_bytes} byte limit"
            ).response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return APIError(e.status, f"{e.reason}: {request.method} {request.path}").response()

    async def _cleanup(self, app) -> None:
        if self.http is not None:
            await self.http.close()

    async def health(self, request: web.Request) -> web.Response:
        e = self.engine
        stats = {"waiting": e.waiting, "running": len(e.rows), "steps": e.steps, "max_running": e.max_running}
        return web.json_response({"status": "ok", **stats})

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mmsmall"}
        return web.json_response({"object": "list", "data": [card]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        req = parse_chat(body, self.model_name, self.opts)
        image_bytes = [await self._image_bytes(url) for url in req.image_urls]
        loop = asyncio.get_running_loop()
        example = await loop.run_in_executor(None, self._encode, image_bytes, req.text)
        events: asyncio.Queue = asyncio.Queue()

        def put(kind):
            return lambda r: loop.call_soon_threadsafe(events.put_nowait, kind)

        job = Request(
            example,
            max_new_tokens=req.max_tokens,
            do_sample=req.temperature > 0,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            on_token=put("token") if req.stream else None,
            on_done=put("done"),
        )
        self._fit(job)
        try:
            self.engine.submit(job)
        except (QueueFull, EngineClosed) as e:
            raise APIError(503, str(e), code="overloaded") from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            if req.stream:
                return await self._stream(request, req, job, events, cid)
            while await self._next_event(request, events) != "done":
                pass
            return web.json_response(self._completion(job, cid))
        except ConnectionResetError:  # the client hung up: nobody to answer
            logger.info("%s: the client closed the connection after %d tokens", cid, len(job.tokens))
            return web.Response(status=499)  # nginx's "client closed request"; never sent
        finally:
            job.cancelled = job.finish_reason is None  # a client that went away frees its row

    async def _next_event(self, request: web.Request, events: asyncio.Queue) -> str:
        """The engine's next event for this request ("token" or "done"); raises ConnectionResetError
        once the client has hung up (checked every half second), so that its row is freed even
        while nothing is being written to it."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("the client closed the connection") from None

    def _encode(self, image_bytes: list[bytes], text: str) -> dict:
        """The prompt as model inputs: no image, one, or several in their order."""
        from mmsmall.processing.crops import ImageLoadError, load_image

        images = []
        for k, data in enumerate(image_bytes):
            name = "the image" if len(image_bytes) == 1 else f"image {k + 1} of {len(image_bytes)}"
            self._check_pixels(data, name)
            try:
                images.append(load_image(data, name=name))
            except ImageLoadError as e:
                status = 413 if "above the limit" in str(e) or "refused" in str(e) else 400
                raise APIError(status, str(e), param="messages") from None
        image = None if not images else images[0] if len(images) == 1 else images
        return self.engine.predictor.encode(image, text)

    def _check_pixels(self, data: bytes, name: str) -> None:
        """Refuse an image whose header gives more pixels than --max-image-pixels (never decoded)."""
        import io
        import warnings

        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
        except Exception:  # unreadable: load_image says why
            return
        if width * height > self.opts.max_image_pixels:
            raise APIError(
                413,
                f"{name} is {width}x{height} = {width * height} pixels, above the server's limit of "
                f"{self.opts.max_image_pixels} (--max-image-pixels); downscale it",
                param="messages",
            )

    def _fit(self, job: Request) -> None:
        from mmsmall.errors import InputTooLong

        try:
            self.engine.fit(job)
        except InputTooLong as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None

    async def _image_bytes(self, url: str) -> bytes:
        limit = self.opts.max_image_bytes
        if url.startswith("data:"):
            data = decode_data_url(url, limit)
        elif url.startswith(("http://", "https://")):
            data = await self._fetch(url, limit)
        else:
            raise APIError(
                400, f"image_url must be a data: URL or an http(s) URL, got {url[:40]!r}", param="messages"
            )
        if len(data) > limit:
            raise APIError(413, f"the image is {len(data)} bytes, above the server's {limit} byte limit")
        return data

    async def _fetch(self, url: str, limit: int) -> bytes:
        if self.http is None:
            self.http = ClientSession(timeout=ClientTimeout(total=self.opts.fetch_timeout))
        try:
            async with self.http.get(url) as resp:
                if resp.status != 200:
                    raise APIError(
                        400, f"fetching the image {url} answered HTTP {resp.status}", param="messages"
                    )
                if (resp.content_length or 0) > limit:
                    raise APIError(413, f"the image at {url} is {resp.content_length} bytes, above {limit}")
                data = await resp.content.read(limit + 1)
        except (ClientError, asyncio.TimeoutError) as e:
            raise APIError(400, f"could not fetch the image {url}: {e or type(e).__name__}") from None
        if len(data) > limit:
            raise APIError(413, f"the image at {url} is above the server's {limit} byte limit")
        return data

    def _usage(self, job: Request) -> dict:
        n = len(job.tokens)
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": job.prompt_tokens + n,
        }

    def _completion(self, job: Request, cid: str) -> dict:
        if job.error is not None:
            raise APIError(500, f"generation failed: {job.error}")
        message = {"role": "assistant", "content": self.engine.text(job)}
        return {
            "id": cid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {"index": 0, "message": message, "finish_reason": job.finish_reason, "logprobs": None}
            ],
            "usage": self._usage(job),
        }

    def _chunk(self, cid: str, delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
        }
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    async def _stream(self, request, req: ChatRequest, job: Request, events, cid) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        await resp.write(self._chunk(cid, {"role": "assistant", "content": ""}))
        sent = ""
        while True:
            kind = await self._next_event(request, events)
            done = kind == "done"
            if done and job.error is not None:
                error = {"error": {"message": f"generation failed: {job.error}", "type": "server_error"}}
                await resp.write(f"data: {json.dumps(error)}\n\n".encode())
                break
            visible = self._visible(job, final=done)
            if visible.startswith(sent) and len(visible) > len(sent):
                await resp.write(self._chunk(cid, {"content": visible[len(sent) :]}))
                sent = visible
            if done:
                await resp.write(self._chunk(cid, {}, finish=job.finish_reason))
                if req.include_usage:
                    await resp.write(self._chunk(cid, {}, usage=self._usage(job)))
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _visible(self, job: Request, final: bool) -> str:
        """The part of the answer that is settled: the final text, or while generating the text so
        far less what a later token could still change (trailing whitespace, a partial character,
        a possible start of a stop string), so that the chunks add up to the non-streamed answer."""
        if final:
            return self.engine.text(job)
        text = self.engine.predictor.tokenizer.decode(job.tokens, skip_special_tokens=True)
        text = text.lstrip().rstrip("\ufffd")
        for stop in job.stop:
            if stop in text:
                return text[: text.index(stop)].rstrip()
        hold = max((k for s in job.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold].rstrip()


# ----------------------------------------------------------------------------- running it


def serve(
    model: str, opts: ServeOptions, device: str = "cpu", dtype: str = "fp32", max_crops: int | None = None
):
    """Load the model, start the engine, serve until SIGINT / SIGTERM, then finish in-flight requests."""
    from mmsmall.inference.predictor import Predictor

    if opts.api_key is None:
        opts.api_key = os.environ.get(API_KEY_ENV) or None
    name = opts.served_model_name or Path(model).resolve().name
    predictor = Predictor(model, device=device, max_crops=max_crops, dtype=dtype)
    engine = Engine(predictor, max_batch=opts.max_batch, max_queue=opts.max_queue).start()
    server = Server(engine, name, opts)
    asyncio.run(_run(server, opts))


async def _run(server: Server, opts: ServeOptions) -> None:
    runner = web.AppRunner(server.app, handle_signals=False, shutdown_timeout=opts.shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"mmsmall serve: {server.model_name} on http://{host}:{port}/v1", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("mmsmall serve: shutting down, finishing in-flight requests", flush=True)
    await runner.cleanup()  # stops listening, waits up to shutdown_timeout for running handlers
    await loop.run_in_executor(None, server.engine.close)
    print("mmsmall serve: stopped", flush=True)
