"""Prompts and training examples through a checkpoint's own chat template (``model.prompt: chat_template``).

A released model is prompted the way it was trained: its tokenizer's chat template renders the
turn (stock Molmo2: the image first, then ``<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``)
and transformers' ``Molmo2Processor`` expands the image into crops and image tokens. The result is
an Example in :mod:`mmsmall.processing.processor`'s layout, so ``collate(left_pad=True)`` batches it
and ``VLM.generate`` decodes it exactly like a prompt of ours.

Training: A model imported from a stock Molmo2 release keeps its chat template (``mmsmall import``), and
it is fine-tuned in it: the conversations of a sample become one multi-turn chat that the
template renders and transformers' ``Molmo2Processor`` tokenizes with the image expanded (the
training crop count, ``model.image.max_crops``). The assistant turns are the targets: turn ``i``
spans from the end of the template's rendering of the turns before it (with the generation
prompt) to the end of its rendering including it, so each answer is trained together with the
end-of-turn text the template puts after it (``<|im_end|>`` for Molmo2), which is where
generation stops at eval. A template that does not render earlier turns as a prefix of later
ones cannot be split this way; such a sample is refused naming the fix.

The Example has the layout of :mod:`mmsmall.processing.processor` (conv_ids all 0: one chat),
so packing, collation and the model take it unchanged, and the prompt of a one-turn chat is
token for token what :class:`~mmsmall.inference.chat_template.ChatTemplateProcessor` gives at eval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from mmsmall.config import ImageConfig
from mmsmall.processing.batch import IGNORE_INDEX
from mmsmall.processing.points import to_point_format
from mmsmall.processing.processor import (
    Encoder,
    EncoderBase,
    Example,
    ImageInput,
    Processor,
    _check_conversation,
    as_images,
    fit_crops,
    load_images,
    to_size,
)


def require_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    """Refuse a tokenizer without a chat template (``model.prompt=chat_template`` needs one)."""
    if not tokenizer.chat_template:
        raise ValueError(
            "model.prompt=chat_template but the tokenizer has no chat template; import the checkpoint "
            "with `mmsmall import` (it copies the template) or set model.prompt=mmsmall"
        )


class ChatTemplateProcessor(EncoderBase):
    """Training examples (``encode``) and generation prompts (``encode_prompt``) through
    ``tokenizer.chat_template`` and the stock Molmo2 processor; the arguments are
    :class:`~mmsmall.processing.processor.Processor`'s (the same :class:`~mmsmall.processing.processor.Encoder`
    interface). Training uses ``image_cfg.max_crops`` (lowered to fit ``max_image_tokens``), prompts
    ``image_cfg.max_crops_eval``; each call hands its crop count to the stock processor."""

    def __init__(self, *args: Any, **kwargs: Any):  # EncoderBase's arguments
        from mmsmall.export.molmo2 import build_molmo2_processor

        super().__init__(*args, **kwargs)
        require_chat_template(self.tokenizer)
        self.hf_processor = build_molmo2_processor(
            self.tokenizer, self.image_cfg, self.tokenizer.chat_template
        )

    def encode(
        self,
        image: Any,
        conversations: Sequence[Sequence[dict[str, str]]],
        task: str | None = None,
        train: bool = True,
        sample_id: str = "",
        pixel_bytes: bool = False,
    ) -> Example:
        """An image (or an ordered list of them, or None) and its conversations (joined into one
        chat) -> an Example with answer targets; the images' crops kept within ``max_image_tokens``.
        Its crops are always float32, normalized by transformers' processor (``pixel_bytes``, the
        Processor's uint8 option, is accepted and has no effect: the loader passes float crops on).

        Whole conversations are dropped from the end until the Example fits ``max_length``
        (counted in ``counters["dropped_conversations"]``); a first one that does not fit raises.
        """
        where = f"sample {sample_id!r}" if sample_id else "sample"
        if not conversations:
            raise ValueError(f"{where}: no conversations to encode")
        for k, conv in enumerate(conversations):
            _check_conversation(conv, f"{where}, conversation {k}")
        images = load_images(image)
        # the image token budget, as Processor applies it: fewer crops per image when over it
        budget = self.max_image_tokens
        crops = self.image_cfg.max_crops if train else self.image_cfg.max_crops_eval
        crops = fit_crops(self.image_cfg, [to_size(im) for im in images], crops, budget, self.counters, where)
        keep = len(conversations)
        while True:
            ex = self._encode(images, crops, conversations[:keep], task, sample_id, where)
            if self.max_length is None or len(ex["input_ids"]) <= self.max_length:
                break
            if keep == 1:
                raise ValueError(
                    f"{where}: the image and the first conversation take {len(ex['input_ids'])} tokens in the "
                    f"chat template, over max_length={self.max_length}. Raise data.seq_len, lower "
                    "model.image.max_crops, or shorten the text."
                )
            keep -= 1
        if not (ex["labels"] != IGNORE_INDEX).any():  # never a silent loss of 0
            raise ValueError(f"{where}: no assistant answer to train on; give each conversation its answer")
        if keep < len(conversations):
            dropped = self.counters.get("dropped_conversations", 0) + len(conversations) - keep
            self.counters["dropped_conversations"] = dropped
        return ex

    def encode_prompt(
        self, image: ImageInput, question: str, task: str | None = None, sample_id: str = ""
    ) -> Example:
        """One user turn (the images first, in order) + the generation prompt -> an Example
        without targets."""
        if self.style_prefix and task:
            question = f"{task}: {question}"
        images = as_images(image)
        content = [{"type": "image", "image": im} for im in images]
        content.append({"type": "text", "text": question})
        enc = self.hf_processor.apply_chat_template(
            [{"role": "user", "content": content}],
            tokenize=True,
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
            processor_kwargs={"max_crops": self.image_cfg.max_crops_eval} if images else None,
        )
        ids = enc["input_ids"][0]  # (T,)
        return template_example(enc, torch.full_like(ids, IGNORE_INDEX), bool(images), sample_id)

    def _messages(self, conversations: Sequence[Sequence[dict[str, str]]], task: str | None) -> list[dict]:
        out = []
        for conv in conversations:
            for m in conv:
                text = m["content"]
                if m["role"] == "user" and self.style_prefix and task:
                    text = f"{task}: {text}"
                elif m["role"] == "assistant":
                    text = to_point_format(text, self.point_format)
                out.append({"role": m["role"], "content": text})
        return out

    def _text_ids(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode(self, images: list, crops: int, conversations, task, sample_id: str, where: str) -> Example:
        messages = self._messages(conversations, task)
        chat = placeholder = messages  # the chat as processed, and as rendered to count text tokens
        if images:  # the images go into the first user turn, in order, as at eval
            text = {"type": "text", "text": messages[0]["content"]}
            parts = [{"type": "image", "image": im} for im in images]
            chat = [dict(messages[0], content=[*parts, text]), *messages[1:]]
            placeholder = [
                dict(messages[0], content=[{"type": "image"}] * len(images) + [text]),
                *messages[1:],
            ]
        enc = self.hf_processor.apply_chat_template(
            chat,
            tokenize=True,
            add_generation_prompt=False,
            return_tensors="pt",
            return_dict=True,
            processor_kwargs={"max_crops": crops} if images else None,
        )
        ids = enc["input_ids"][0]  # (T,) with the image expanded
        text_ids = self._text_ids(placeholder, False)
        shift = len(ids) - len(text_ids)  # the image block (and any BOS) sits before every answer
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, m in enumerate(placeholder):
            if m["role"] != "assistant":
                continue
            before = self._text_ids(placeholder[:i], True)  # up to the generation prompt of turn i
            through = self._text_ids(placeholder[: i + 1], False)  # through turn i's end
            start, end = len(before), len(through)
            span = torch.tensor(text_ids[start:end], dtype=torch.long)
            if (
                end <= start
                or text_ids[:start] != before
                or text_ids[:end] != through
                or not torch.equal(ids[start + shift : end + shift], span)
            ):
                raise ValueError(
                    f"{where}: the chat template does not render earlier turns as a prefix of later ones, so "
                    "the answers cannot be located; fine-tune with model.prompt=mmsmall"
                )
            labels[start + shift : end + shift] = span
        return template_example(enc, labels, bool(images), sample_id)


def template_example(enc: dict, labels: torch.Tensor, with_image: bool, sample_id: str) -> Example:
    """A chat the stock processor encoded (``apply_chat_template`` output, one row) as an Example:
    one conversation (conv_ids 0), positions from 0, ``labels`` (T,) as given."""
    ids = enc["input_ids"][0]  # (T,)
    t = ids.shape[0]
    ex: Example = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.arange(t),
        "conv_ids": torch.zeros(t, dtype=torch.long),
        "sample_id": sample_id,
    }
    if with_image:
        ex.update({k: enc[k] for k in ("pixel_values", "image_token_pooling", "image_grids")})
    return ex


def make_processor(
    prompt: str,
    tokenizer: PreTrainedTokenizerFast,
    image_cfg: ImageConfig,
    style_prefix: bool = False,
    max_length: int | None = None,
    max_image_tokens: int | None = None,
    point_format: str = "molmo",
) -> Encoder:
    """The one place a processor is chosen: by the model's prompt format (``model.prompt``): ours
    (:class:`Processor`) or the checkpoint's chat template (:class:`ChatTemplateProcessor`).
    Training, the Predictor (eval, chat, predict, live eval) and the lmms-eval backend call it."""
    cls = ChatTemplateProcessor if prompt == "chat_template" else Processor
    return cls(
        tokenizer, image_cfg, style_prefix, max_length=max_length, max_image_tokens=max_image_tokens,
        point_format=point_format,
    )  # fmt: skip
