"""A generation engine where requests join and leave a running batch (continuous batching).

Each request is prefilled on its own admission step (with the others admitted at that step),
then its KV cache rows join the running batch: the running cache and the new rows are left-padded
to a common length and stacked, with a per-row key mask marking the padding as unseen. Every decode
step feeds each running row its last token; a row that finishes (EOS, a stop string, its token
budget, or a cancelled client) leaves at once, its cache rows are dropped and columns no row sees
any more are trimmed. No request waits for another to finish.

The attention rule and positions are those of :meth:`VLM.generate` (prompt keys from the prefill
mask, then every generated token), so a greedy request answers as ``Predictor.predict`` does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

logger = logging.getLogger(__name__)

# The batch keys VLM.prefill reads.
PREFILL_KEYS = (
    "input_ids", "attention_mask", "position_ids", "doc_ids", "conv_ids", "pixel_values", "image_token_pooling"
)  # fmt: skip


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound (the server answers 503)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(eq=False)  # compared by identity (it holds tensors)
class Request:
    """One prompt to generate from; ``example`` is ``Predictor.encode`` output."""

    example: dict
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks; vLLM's ignore_eos)
    # called in the engine thread after every new token, and once when the request ends
    on_token: Callable[[Request], None] | None = None
    on_done: Callable[[Request], None] | None = None
    tag: object = None  # the caller's own (the eval runner's record index and image size)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: BaseException | None = None
    cancelled: bool = False
    submitted_at: float = 0.0
    generator: torch.Generator | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.example["input_ids"].shape[-1])


class Engine:
    """Continuous-batching generation over a :class:`~mmsmall.inference.predictor.Predictor`'s model.

    Args:
        predictor: the loaded model, its processor and tokenizer.
        max_batch: most requests decoding together.
        max_queue: most requests waiting for admission; :meth:`submit` raises :class:`QueueFull` past it.
        max_prefill: most requests prefilled in one step (bounds the pause a join costs running rows).
    """

    def __init__(self, predictor, max_batch: int = 32, max_queue: int = 256, max_prefill: int = 8):
        if min(max_batch, max_queue, max_prefill) < 1:
            raise ValueError(
                f"max_batch, max_queue and max_prefill must be >= 1, got {max_batch}, {max_queue}, {max_prefill}"
            )
        self.predictor = predictor
        self.model = predictor.model
        self.tokenizer = predictor.tokenizer
        self.max_batch, self.max_queue, self.max_prefill = max_batch, max_queue, max_prefill
        kinds = {type(layer) for layer in DynamicCache(config=self.model.llm.config).layers}
        if kinds - {DynamicLayer}:
            raise NotImplementedError(
                f"the engine stacks plain per-request KV caches; this LLM's cache layers are "
                f"{sorted(k.__name__ for k in kinds)} (sliding-window or other kinds are not supported)"
            )
        self.eos_id = self.tokenizer.eos_token_id
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._thread: threading.Thread | None = None
        # the running batch: its requests, KV cache, key mask (B, L), next positions (B,), tokens to feed (B,)
        self.rows: list[Request] = []
        self._cache: DynamicCache | None = None
        self._keys = self._pos = self._pending = None
        self.steps = 0  # decode steps run (for benchmarks and tests)
        self.max_running = 0  # the most rows that decoded together

    # ------------------------------------------------------------------ public

    def fit(self, request: Request) -> Request:
        """Cap ``max_new_tokens`` to the positions the model has left (``InputTooLong`` past them)."""
        batch = self.predictor.collate([request.example])
        request.max_new_tokens = self.predictor._fit_positions(batch, request.max_new_tokens)
        return request

    def submit(self, request: Request) -> Request:
        """Queue a request (thread-safe); raises :class:`QueueFull` or :class:`EngineClosed`."""
        if request.do_sample and request.seed is not None:
            request.generator = torch.Generator(device=self.model.device).manual_seed(request.seed)
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down; retry on another replica")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (the queue holds {self.max_queue}); "
                    "retry later"
                )
            request.submitted_at = time.perf_counter()
            self._waiting.append(request)
            self._wake.notify()
        return request

    def start(self) -> Engine:
        """Run the engine loop in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mmsmall-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the waiting and running ones, stop the thread."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Submit every request (waiting for room in the queue) and return them once all ended."""
        futures = []
        for request in requests:
            future: Future = Future()
            done = request.on_done
            request.on_done = lambda r, f=future, d=done: (d(r) if d else None, f.set_result(r))
            futures.append(future)
            while True:
                try:
                    self.submit(request)
                    break
                except QueueFull:
                    time.sleep(0.005)
        if self._thread is None:  # no loop running: drive it here
            while any(not f.done() for f in futures):
                self.step()
        out = [f.result() for f in futures]
        for r in out:
            if r.error is not None:
                raise r.error
        return out

    def text(self, request: Request) -> str:
        """The answer as ``Predictor.answer`` decodes it."""
        return self.predictor.text(request.tokens, request.stop)

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self.rows and not self._closing:
                    self._wake.wait()
                if self._closing and not self._waiting and not self.rows:
                    return
            self.step()

    def step(self) -> None:
        """Admit waiting requests (prefill), then one decode step of the running batch."""
        self._drop_cancelled()
        room = min(self.max_batch - len(self.rows), self.max_prefill)
        admitted: list[Request] = []
        with self._lock:
            while room > 0 and self._waiting:
                request = self._waiting.popleft()
                if request.cancelled:
                    self._finish(request, "cancelled")
                    continue
                admitted.append(request)
                room -= 1
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as e:  # a bad batch fails its own requests, the engine goes on
                logger.exception("prefill failed")
                for request in admitted:
                    request.error = e
                    self._finish(request, "error")
        if self.rows:
            try:
                self._decode()
            except Exception as e:
                logger.exception("decode step failed")
                for request in self.rows:
                    request.error = e
                    self._finish(request, "error")
                self._reset()

    # ------------------------------------------------------------------ internals

    @torch.no_grad()
    def _prefill(self, requests: list[Request]) -> None:
        batch = self.predictor.collate([r.example for r in requests])
        device = self.model.device
        on = prefill_inputs(batch, device)
        cache = DynamicCache(config=self.model.llm.config)
        out, allowed = self.model.prefill(**on, cache=cache, use_cache=True, logits_to_keep=1)
        keys = allowed[:, 0, -1, :]  # (b, T): what a token after the prompt may see
        pos = on["position_ids"][:, -1] + 1  # (b,)
        tokens = self._pick(out.logits[:, -1], requests)
        keep = [i for i, r in enumerate(requests) if not self._append(r, int(tokens[i]))]
        if not keep:
            return
        index = torch.tensor(keep, device=device)
        if len(keep) < len(requests):
            cache.batch_select_indices(index)
        self._join(cache, keys[index], pos[index], tokens[index], [requests[i] for i in keep])
        self.max_running = max(self.max_running, len(self.rows))

    @torch.no_grad()
    def _decode(self) -> None:
        b = len(self.rows)
        keys = torch.cat([self._keys, torch.ones(b, 1, dtype=torch.bool, device=self._keys.device)], 1)
        out = self.model.decode(self._pending[:, None], keys, self._pos[:, None], self._cache)
        self._keys, self._pos = keys, self._pos + 1
        self.steps += 1
        tokens = self._pick(out.logits[:, -1], self.rows)
        self._pending = tokens
        keep = [i for i, r in enumerate(self.rows) if not self._append(r, int(tokens[i]))]
        self._select(keep)

    def _pick(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """(B, V) logits -> (B,) next tokens: greedy rows by argmax, sampled rows each by its own settings."""
        from mmsmall.model.vlm import _next_token

        logits = self.model.emittable(logits.float())
        tokens = logits.argmax(-1)
        for i, r in enumerate(requests):
            if r.do_sample and r.temperature > 0:
                tokens[i] = _next_token(logits[i : i + 1], True, r.temperature, r.top_p, r.generator)[0]
        return tokens

    def _append(self, request: Request, token: int) -> bool:
        """Record a token; True when the request has ended (and its callbacks ran)."""
        request.tokens.append(token)
        if request.on_token is not None:
            request.on_token(request)
        if token == self.eos_id and not request.ignore_eos:
            reason = "stop"
        elif request.stop and any(
            s in self.tokenizer.decode(request.tokens, skip_special_tokens=False) for s in request.stop if s
        ):
            reason = "stop"
        elif len(request.tokens) >= request.max_new_tokens:
            reason = "length"
        elif request.cancelled:
            reason = "cancelled"
        else:
            return False
        self._finish(request, reason)
        return True

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request.on_done is not None:
            request.on_done(request)

    def _drop_cancelled(self) -> None:
        if any(r.cancelled for r in self.rows):
            keep = []
            for i, r in enumerate(self.rows):
                if r.cancelled:
                    self._finish(r, "cancelled")
                else:
                    keep.append(i)
            self._select(keep)

    def _select(self, keep: list[int]) -> None:
        """Keep these rows of the running batch; trim the leading columns no kept row sees."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self._keys.device)
        self._cache.batch_select_indices(index)
        self._keys, self._pos, self._pending = self._keys[index], self._pos[index], self._pending[index]
        self.rows = [self.rows[i] for i in keep]
        first = int(self._keys.any(0).long().argmax())  # the first column some row sees
        if first:
            self._keys = self._keys[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _join(self, cache, keys, pos, pending, requests: list[Request]) -> None:
        """Stack newly prefilled rows under the running ones, left-padding the shorter cache."""
        if not self.rows:
            self._cache, self._keys, self._pos, self._pending = cache, keys, pos, pending
            self.rows = list(requests)
            return
        length = max(self._keys.shape[1], keys.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)], 0)
            old.values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)], 0)
        self._keys = torch.cat([_left_pad_mask(self._keys, length), _left_pad_mask(keys, length)], 0)
        self._pos = torch.cat([self._pos, pos])
        self._pending = torch.cat([self._pending, pending])
        self.rows += requests

    def _reset(self) -> None:
        self.rows, self._cache, self._keys, self._pos, self._pending = [], None, None, None, None


def prefill_inputs(batch: dict, device: torch.device) -> dict:
    """The keys of a collated batch that ``VLM.prefill`` reads, on ``device``, with the attention
    mask and positions filled in where the batch has none."""
    on = {k: batch[k].to(device) for k in PREFILL_KEYS if batch.get(k) is not None}
    if "attention_mask" not in on:
        on["attention_mask"] = torch.ones_like(on["input_ids"])
    if "position_ids" not in on:
        on["position_ids"] = (on["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return on


def _left_pad(kv: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, length, D) with zeros in front."""
    b, h, n, d = kv.shape
    if n == length:
        return kv
    return torch.cat([kv.new_zeros(b, h, length - n, d), kv], 2)


def _left_pad_mask(keys: torch.Tensor, length: int) -> torch.Tensor:
    b, n = keys.shape
    if n == length:
        return keys
    return torch.cat([keys.new_zeros(b, length - n), keys], 1)
