"""Predictor: images + questions -> answers, batched and left-padded (what eval and chat call)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from mmsmall.model.vlm import VLM

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The least value of each number chat / predict / eval take (None everywhere means "the default").
MINIMUM = {"max_new_tokens": 1, "max_crops": 1, "batch_size": 1, "limit": 1, "num_workers": 0}


def check_options(**values: int | None) -> None:
    """Refuse an out-of-range number before any model loads: a ConfigError naming the option as
    typed (``max_new_tokens`` -> ``--max-new-tokens``), its value and its least allowed value."""
    from mmsmall.config import ConfigError

    for name, value in values.items():
        if value is not None and value < MINIMUM[name]:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {MINIMUM[name]}, got {value}")


def _placed(model: VLM, device: torch.device, dtype: torch.dtype) -> VLM:
    """``model`` itself when every parameter already is on ``device`` in ``dtype``; else a copy
    moved and cast there (the caller's model, e.g. one in training, is never changed)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if all(p.device == device and p.dtype == dtype for p in model.parameters()):
        return model
    logger.info("Predictor: a copy of the model on %s in %s (the given one stays as it is)", device, dtype)
    return copy.deepcopy(model).to(device=device, dtype=dtype)


class Predictor:
    """Answer questions about images with a :class:`VLM`.

    Args:
        model_or_dir: a VLM, or a folder: ``VLM.save_pretrained`` output, an ``mmsmall export``
            release (our HF format or the stock Molmo2 format), a training run or a checkpoint.
        device: where to run.
        max_crops: high-resolution crops per image (default: ``model.image.max_crops_eval``).
        dtype: ``fp32``, ``bf16`` or ``fp16`` weights and activations.

    The prompt format follows the checkpoint (``model.prompt``): ours (`` User: ... Assistant:``)
    or, for imported releases, their own chat template (:mod:`mmsmall.inference.chat_template`).
    """

    def __init__(
        self,
        model_or_dir: VLM | str | Path,
        device: str | torch.device = "cpu",
        max_crops: int | None = None,
        dtype: str = "fp32",
    ):
        from mmsmall.inference.chat_template import make_processor  # built lazily: transformers' processors

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        check_options(max_crops=max_crops)
        if isinstance(model_or_dir, VLM):  # the caller's: used as it is, or a cast copy of it
            self.model = _placed(model_or_dir, torch.device(device), DTYPES[dtype])
        else:
            from mmsmall.export.load import load_model

            self.model = load_model(model_or_dir).to(device=device, dtype=DTYPES[dtype])
        self.device = torch.device(device)
        self.dtype = dtype
        cfg = self.model.cfg
        image_cfg = copy.deepcopy(cfg.image)
        crops = max_crops if max_crops is not None else image_cfg.max_crops_eval
        image_cfg.max_crops = image_cfg.max_crops_eval = crops
        self.max_crops = crops
        self.prompt_format = cfg.prompt
        self.point_format = cfg.point_format  # the pointing text it was trained in (eval reads both)
        self.tokenizer = self.model.tokenizer
        self.processor = make_processor(cfg.prompt, self.tokenizer, image_cfg, cfg.style_prefix)

    @torch.no_grad()
    def predict(
        self,
        images: Sequence[Image.Image | None],
        questions: Sequence[str],
        max_new_tokens: int = 32,
        task: str | None = None,
        batch_size: int = 8,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] = (),
    ) -> list[str]:
        """One answer per (image, question); ``None`` images give text-only prompts (``blind`` eval).

        Batch by batch: :meth:`encode` each pair, :meth:`collate` them left-padded, :meth:`answer`.
        The eval runner runs the same three steps, the first two in DataLoader workers."""
        if len(images) != len(questions):
            raise ValueError(
                f"predict: {len(images)} images but {len(questions)} questions; give one image per question"
            )
        check_options(batch_size=batch_size, max_new_tokens=max_new_tokens)
        answers: list[str] = []
        for start in range(0, len(questions), batch_size):
            pairs = zip(images[start : start + batch_size], questions[start : start + batch_size])
            batch = self.collate([self.encode(image, question, task=task) for image, question in pairs])
            answers += self.answer(batch, max_new_tokens, do_sample, temperature, top_p, stop_strings)
        return answers

    def encode(self, image: Image.Image | None, question: str, task: str | None = None) -> dict:
        """One prompt as model inputs (the checkpoint's prompt format; ``task`` adds its style)."""
        return self.processor.encode_prompt(image, question, task=task)

    def collate(self, examples: Sequence[dict]) -> dict:
        """Encoded prompts -> one LEFT-padded batch, as generation needs."""
        from mmsmall.processing.processor import collate

        return collate(list(examples), self.tokenizer.pad_token_id, left_pad=True)

    @torch.no_grad()
    def answer(
        self,
        batch: dict,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] = (),
    ) -> list[str]:
        """Generate from a collated batch and decode: special tokens (EOS) dropped, cut at the first
        stop string, stripped."""
        check_options(max_new_tokens=max_new_tokens)
        was_training = self.model.training
        self.model.eval()  # generation without dropout; a caller's training model gets its mode back
        try:
            new_tokens = self.model.generate(
                batch,
                max_new_tokens=self._fit_positions(batch, max_new_tokens),
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                stop_strings=tuple(stop_strings),
            )
        finally:
            self.model.train(was_training)
        return [self.text(tokens, stop_strings) for tokens in new_tokens]

    def text(self, tokens: Sequence[int], stop_strings: Sequence[str] = ()) -> str:
        """New token ids -> the answer: special tokens (EOS) dropped, cut at the first stop string,
        stripped (what :meth:`answer` and the serving engine return)."""
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)  # EOS is special: dropped
        for stop in stop_strings:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text.strip()

    def _fit_positions(self, batch: dict, max_new_tokens: int) -> int:
        """``max_new_tokens``, capped with a warning to the positions the model has left after the
        longest prompt (``max_position_embeddings``); a prompt past them is refused, since what a
        model answers there is noise, and cutting the prompt would cut the image or the question."""
        from mmsmall.errors import InputTooLong

        limit = getattr(self.model.llm.config, "max_position_embeddings", None)
        if not limit:
            return max_new_tokens
        used = batch["position_ids"].amax(dim=1) + 1  # (B,) positions each prompt takes
        row = int(used.argmax())
        longest = int(used[row])
        if longest > limit:
            ids = batch.get("sample_ids") or []
            name = f" (sample {ids[row]!r})" if row < len(ids) and ids[row] else ""
            raise InputTooLong(
                f"a prompt{name} takes {longest} positions, past the model's max_position_embeddings="
                f"{limit}; shorten the question or lower --max-crops (fewer image tokens)"
            )
        room = limit - longest + 1  # the last new token needs no position of its own
        if max_new_tokens > room:
            logger.warning(
                "a prompt takes %d of the model's %d positions: generating at most %d new tokens, not %d",
                longest, limit, room, max_new_tokens,
            )  # fmt: skip
        return min(max_new_tokens, room)
