"""Processor: images + their conversations -> an Example of tensors; ``collate`` -> a Batch.

Sequence layout of one Example (see ``tokens.py`` for the text format)::

    [BOS, image blocks]           conv_ids 0, positions 0 .. P-1      (shared prefix)
    [ User: q1 Assistant: a1 EOS] conv_ids 1, positions P .. P+L1-1
    [ User: q2 Assistant: a2 EOS] conv_ids 2, positions P .. P+L2-1   (restart after the prefix)

A sample holds an ordered list of images (one image is the list of one; none is a text-only
sample): their blocks follow BOS in order, as stock ``Molmo2Processor`` expands a prompt that
starts with one ``<|image|>`` per image, and their crops and pooling indices are concatenated in
the same order (each image's indices offset by the patches of the images before it).

Image token budget (``max_image_tokens``, training's ``data.max_image_tokens``): when the blocks
of a sample's images would take more tokens than the budget, the crops per image are lowered
together (the same cap for every image of the sample, from ``max_crops`` down to 1) until they
fit, counted in ``counters["lowered_image_crops"]`` (one per such sample); a sample whose images
do not fit even at one crop each raises ``ValueError`` naming the numbers.

Several conversations about one image share the prefix; the model's mask lets conversation k
see the prefix and itself only. ``labels`` are -100 except on answer tokens and the EOS after
each answer. User and assistant text is tokenized with special-token splitting on, so a literal
``<im_patch>`` typed by a user is plain text, never an image placeholder.

Truncation (``max_length``): whole conversations are dropped from the end until the example
fits (counted in ``Processor.counters``: ``dropped_conversations``, and their answer tokens in
``truncated_targets``; training logs both, see mmsmall/data/loader.py); the image block is never cut,
and an example whose prefix plus first conversation does not fit raises ``ValueError``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from mmsmall.config import ImageConfig
from mmsmall.processing.batch import IGNORE_INDEX, Batch, Example, collate  # noqa: F401  (collate: the batch builder)
from mmsmall.processing.crops import image_grid, load_image, preprocess_image
from mmsmall.processing.points import check_point_format, to_point_format
from mmsmall.processing.tokenizer import special_ids
from mmsmall.processing.tokens import answer_text, image_token_ids, user_text

# One sample's images: one image (a PIL image, an (H, W, 3) array, a path), an ordered list of
# them, or None (text only).
OneImage = Image.Image | np.ndarray | str | os.PathLike
ImageInput = OneImage | Sequence[OneImage] | None


@runtime_checkable
class Encoder(Protocol):
    """What every processor offers (ours, :class:`Processor`; a checkpoint's chat template,
    :class:`mmsmall.inference.chat_template.ChatTemplateProcessor`), chosen in one place:
    :func:`mmsmall.inference.chat_template.make_processor`."""

    counters: dict[str, int]  # what encoding dropped or lowered, for the training log

    def encode(
        self,
        image: ImageInput,
        conversations: Sequence[Sequence[dict[str, str]]],
        task: str | None = None,
        train: bool = True,
        sample_id: str = "",
        pixel_bytes: bool = False,
    ) -> Example:
        """A training example: the images and their conversations, answers as targets
        (``pixel_bytes``: uint8 crops where the processor can give them, see :class:`Processor`)."""
        ...

    def encode_prompt(
        self, image: ImageInput, question: str, task: str | None = None, sample_id: str = ""
    ) -> Example:
        """A generation prompt: the images and one question, no targets."""
        ...


class EncoderBase:
    """The settings both processors take and keep (see :class:`Processor` for their meaning)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        image_cfg: ImageConfig,
        style_prefix: bool = False,
        max_length: int | None = None,
        max_image_tokens: int | None = None,
        point_format: str = "molmo",
    ):
        check_point_format(point_format)
        if max_image_tokens is not None and max_image_tokens < 1:
            raise ValueError(f"max_image_tokens={max_image_tokens} must be at least 1 (or None: no cap)")
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg
        self.style_prefix = style_prefix
        self.max_length = max_length
        self.max_image_tokens = max_image_tokens
        self.point_format = point_format
        self.counters: dict[str, int] = {}


class Processor(EncoderBase):
    """Turns (image, conversations) into model inputs; see the module docstring for the layout.

    Args:
        tokenizer: from :func:`mmsmall.processing.tokenizer.build_tokenizer`.
        image_cfg: crop size, patch size, crops (train / eval), margins, pooling, mean/std.
        style_prefix: prepend ``{task}: `` to questions (Molmo's task styles).
        max_length: longest Example in tokens (None = no limit); see truncation above.
        max_image_tokens: image tokens one sample may take (None = no cap); see the budget above.
        point_format: the pointing text answers are trained in (``molmo`` | ``molmo2``: Molmo's
            tags in the answers are rewritten in Molmo2's, ``points.to_point_format``).
    """

    def __init__(self, *args: Any, **kwargs: Any):  # EncoderBase's arguments
        super().__init__(*args, **kwargs)
        tokenizer = self.tokenizer
        self.ids = special_ids(tokenizer)
        self.bos_id, self.eos_id = self.ids["bos"], self.ids["eos"]
        # A private copy of the Rust tokenizer that always splits special-token strings: text can
        # never produce <im_patch>, BOS, EOS... and the shared tokenizer's state is never toggled
        # (``tokenizer(..., split_special_tokens=True)`` flips a flag on it, a race between threads).
        self._text_tokenizer = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._text_tokenizer.encode_special_tokens = True
        self._text_tokenizer.no_padding()
        self._text_tokenizer.no_truncation()

    # ------------------------------------------------------------------ pieces

    def preprocess(
        self,
        image: Image.Image | np.ndarray | str | os.PathLike,
        train: bool = True,
        max_crops: int | None = None,
        pixel_bytes: bool = False,
    ) -> dict:
        """Crops and pooling indices of one image (``crops.preprocess_image`` with this config;
        ``max_crops`` overrides the config's training / eval crop count; ``pixel_bytes``: uint8
        crops before normalization, see ``encode``)."""
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        c = self.image_cfg
        return preprocess_image(
            image,
            crop_size=c.crop_size,
            patch_size=c.patch_size,
            max_crops=max_crops or self._crops(train),
            overlap_margins=tuple(c.overlap_margins),
            pooling_size=tuple(c.pooling_size),
            mean=tuple(c.mean),
            std=tuple(c.std),
            normalize=not pixel_bytes,
        )

    def _crops(self, train: bool) -> int:
        return self.image_cfg.max_crops if train else self.image_cfg.max_crops_eval

    def block_tokens(self, size: tuple[int, int], max_crops: int) -> int:
        """Tokens of one image block for an image of ``size = (height, width)`` pixels."""
        return block_tokens(self.image_cfg, size, max_crops)

    def fit_crops(self, sizes: Sequence[tuple[int, int]], train: bool, where: str = "sample") -> int:
        """The crops per image for images of ``sizes`` (height, width): the configured count, or
        lower (the same for all) to keep their blocks within ``max_image_tokens``."""
        return fit_crops(
            self.image_cfg, sizes, self._crops(train), self.max_image_tokens, self.counters, where
        )

    def tokenize_text(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of plain text pieces; special-token strings in them stay plain text."""
        if not texts:
            return []
        if not self._text_tokenizer.encode_special_tokens:  # the flag does not survive pickling
            self._text_tokenizer.encode_special_tokens = True
        return [enc.ids for enc in self._text_tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def _prefix(
        self, image: Any, train: bool, where: str = "sample", pixel_bytes: bool = False
    ) -> tuple[torch.Tensor, dict]:
        """BOS + one image block per image ``(P,)`` and the images' tensors (empty without one)."""
        bos = torch.tensor([self.bos_id], dtype=torch.long)
        images = load_images(image)
        if not images:
            return bos, {}
        sizes = [to_size(im) for im in images]
        crops = self.fit_crops(sizes, train, where)
        parts, pixels, pooling, grids, n_patches = [bos], [], [], [], 0
        for im in images:
            img = self.preprocess(im, train=train, max_crops=crops, pixel_bytes=pixel_bytes)
            block = image_token_ids(img["image_grids"], self.ids)
            n_patch_tokens = int((block == self.ids["<im_patch>"]).sum())
            if n_patch_tokens != img["image_token_pooling"].shape[0]:  # guards the layout against drift
                raise AssertionError(
                    f"{n_patch_tokens} <im_patch> tokens but {img['image_token_pooling'].shape[0]} pooled features"
                )
            parts.append(block)
            pool = img["image_token_pooling"]
            pooling.append(torch.where(pool >= 0, pool + n_patches, pool))
            pixels.append(img["pixel_values"])
            grids.append(img["image_grids"])
            n_patches += img["pixel_values"].shape[0] * img["pixel_values"].shape[1]
        tensors = {
            "pixel_values": pixels[0] if len(pixels) == 1 else torch.cat(pixels),
            "image_token_pooling": pooling[0] if len(pooling) == 1 else torch.cat(pooling),
            "image_grids": torch.cat(grids),  # (n_images, 4)
        }
        return torch.cat(parts), tensors

    # ------------------------------------------------------------------ encoding

    def encode(
        self,
        image: ImageInput,
        conversations: Sequence[Sequence[dict[str, str]]],
        task: str | None = None,
        train: bool = True,
        sample_id: str = "",
        pixel_bytes: bool = False,
    ) -> Example:
        """Encode an image (or an ordered list of images, or None) with one or more conversations
        (lists of ``{"role", "content"}``).

        Each conversation alternates ``user`` / ``assistant`` turns starting with ``user``; a
        final user turn without an answer is allowed (it ends with `` Assistant:``).
        Returns ``input_ids labels position_ids conv_ids (T,)`` int64, ``sample_id`` and, with an
        image, ``pixel_values (n_crops, n_patches, 3*patch^2)``, ``image_token_pooling (n_tok, K)``,
        ``image_grids (n_images, 4)``.

        ``pixel_bytes=True`` gives ``pixel_values`` as uint8: the resized crops before
        ``(x - mean) / std`` (4x smaller, for data workers to ship); ``normalize_pixels(pixel_values,
        image_cfg.mean, image_cfg.std)`` turns them into exactly the float32 values of the default.
        """
        where = f"sample {sample_id!r}" if sample_id else "sample"
        if not conversations:
            raise ValueError(f"{where}: no conversations to encode")
        segments: list[tuple[int, str, bool]] = []  # (conversation index, text, is_target)
        for k, conv in enumerate(conversations):
            _check_conversation(conv, f"{where}, conversation {k}")
            for msg in conv:
                if msg["role"] == "user":
                    segments.append((k, user_text(msg["content"], task, self.style_prefix), False))
                else:
                    answer = to_point_format(msg["content"], self.point_format)
                    segments.append((k, answer_text(answer), True))
        pieces = self.tokenize_text([text for _, text, _ in segments])

        # Per conversation: ids and target flags, EOS after each answer.
        conv_ids_list: list[list[int]] = [[] for _ in conversations]
        conv_tgt: list[list[bool]] = [[] for _ in conversations]
        for (k, text, is_target), ids in zip(segments, pieces):
            if is_target and not ids and text.strip():
                raise ValueError(f"{where}, conversation {k}: the answer {text!r} tokenized to nothing")
            conv_ids_list[k] += ids
            conv_tgt[k] += [is_target] * len(ids)
            if is_target:
                conv_ids_list[k].append(self.eos_id)
                conv_tgt[k].append(True)

        prefix, image_tensors = self._prefix(image, train, where, pixel_bytes)
        keep = self._fit(len(prefix), [len(c) for c in conv_ids_list], where)
        cut = sum(sum(t) for t in conv_tgt[keep:])
        if cut:  # the answer tokens of the dropped conversations
            self.counters["truncated_targets"] = self.counters.get("truncated_targets", 0) + cut
        # Never a silent loss of 0: a training example keeps at least one answer to learn.
        if train and not any(any(tgt) for tgt in conv_tgt[:keep]):
            dropped = len(conversations) - keep
            raise ValueError(
                f"{where}: no assistant answer to train on"
                + (f" ({dropped} later conversation(s) dropped to fit max_length)" if dropped else "")
                + "; give each conversation its answer, or encode it as a prompt (train=False)"
            )
        return self._assemble(prefix, conv_ids_list[:keep], conv_tgt[:keep], image_tensors, sample_id)

    def encode_prompt(
        self,
        image: ImageInput,
        question: str,
        task: str | None = None,
        sample_id: str = "",
    ) -> Example:
        """A generation prompt: prefix + `` User: {question} Assistant:`` (eval crop count, no targets)."""
        return self.encode(
            image, [[{"role": "user", "content": question}]], task=task, train=False, sample_id=sample_id
        )

    def _fit(self, prefix_len: int, conv_lens: list[int], where: str) -> int:
        """How many leading conversations fit in ``max_length`` (raises if not even one)."""
        if self.max_length is None:
            return len(conv_lens)
        total = prefix_len + np.cumsum(conv_lens)  # (n_conv,)
        keep = int(np.searchsorted(total, self.max_length, side="right"))
        if keep == 0:
            raise ValueError(
                f"{where}: the image prefix ({prefix_len} tokens) plus the first conversation "
                f"({conv_lens[0]} tokens) exceed max_length={self.max_length}; the image block is never "
                "cut. Raise data.seq_len, lower model.image.max_crops, or shorten the text."
            )
        dropped = len(conv_lens) - keep
        if dropped:
            self.counters["dropped_conversations"] = self.counters.get("dropped_conversations", 0) + dropped
        return keep

    def _assemble(
        self,
        prefix: torch.Tensor,
        convs: list[list[int]],
        targets: list[list[bool]],
        image_tensors: dict,
        sample_id: str,
    ) -> Example:
        P = len(prefix)
        lens = [len(c) for c in convs]
        body = torch.tensor([t for c in convs for t in c], dtype=torch.long)  # (sum L,)
        is_target = torch.tensor([t for c in targets for t in c], dtype=torch.bool)  # (sum L,)
        input_ids = torch.cat([prefix, body])  # (T,)
        labels = torch.cat(
            [torch.full((P,), IGNORE_INDEX, dtype=torch.long), body.masked_fill(~is_target, IGNORE_INDEX)]
        )
        conv_ids = torch.cat(
            [
                torch.zeros(P, dtype=torch.long),
                torch.repeat_interleave(torch.arange(1, len(convs) + 1), torch.tensor(lens)),
            ]
        )
        # positions restart after the prefix for every conversation: P + offset inside it
        starts = torch.tensor([0, *np.cumsum(lens)[:-1].tolist()], dtype=torch.long)  # (n_conv,)
        offsets = torch.arange(len(body)) - torch.repeat_interleave(starts, torch.tensor(lens))
        position_ids = torch.cat([torch.arange(P), P + offsets])
        ex: Example = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "conv_ids": conv_ids,
            "sample_id": sample_id,
        }
        ex.update(image_tensors)
        return ex


def block_tokens(image_cfg: ImageConfig, size: tuple[int, int], max_crops: int) -> int:
    """Tokens of one image block for an image of ``size = (height, width)`` pixels at
    ``max_crops``, counted from the geometry alone (no pixels touched)."""
    c = image_cfg
    low_h, low_w, high_h, high_w = image_grid(
        *size,
        crop_size=c.crop_size,
        patch_size=c.patch_size,
        max_crops=max_crops,
        overlap_margins=tuple(c.overlap_margins),
        pooling_size=tuple(c.pooling_size),
    )[0]
    return 4 + low_h * (low_w + 1) + high_h * (high_w + 1)  # 2 starts, 2 ends, an <im_col> per row


def fit_crops(
    image_cfg: ImageConfig,
    sizes: Sequence[tuple[int, int]],
    crops: int,
    budget: int | None,
    counters: dict[str, int],
    where: str = "sample",
) -> int:
    """The most crops per image, at most ``crops`` and the same for every image, with which the
    blocks of images of ``sizes`` take at most ``budget`` tokens (None: ``crops``). A sample that
    had to be lowered adds one to ``counters["lowered_image_crops"]``; one that does not fit even
    at one crop each raises ``ValueError``."""
    if budget is None or not sizes:
        return crops
    for k in range(crops, 0, -1):
        total = sum(block_tokens(image_cfg, size, k) for size in sizes)
        if total <= budget:
            if k < crops:
                counters["lowered_image_crops"] = counters.get("lowered_image_crops", 0) + 1
            return k
    raise ValueError(
        f"{where}: its {len(sizes)} image(s) take {total} image tokens even at one crop each, over "
        f"max_image_tokens={budget}; raise data.max_image_tokens (and data.seq_len) or split the sample"
    )


def as_images(image: Any) -> list:
    """A sample's images as a list: ``None`` -> ``[]``, one image -> ``[image]``, a list or tuple
    of images as it is (order kept)."""
    if image is None:
        return []
    if isinstance(image, (list, tuple)):
        if any(im is None for im in image):
            raise ValueError("a sample's image list holds None; drop the missing image or the sample")
        return list(image)
    return [image]


def load_images(image: Any) -> list:
    """A sample's images as a list (:func:`as_images`), paths opened (``crops.load_image``)."""
    return [load_image(im) if isinstance(im, (str, os.PathLike)) else im for im in as_images(image)]


def to_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(height, width) of a PIL image or an (H, W[, C]) array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


def _check_conversation(conv: Any, where: str) -> None:
    if not isinstance(conv, (list, tuple)) or not conv:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {conv!r}")
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{where}, message {i}: expected {{'role': ..., 'content': ...}}, got {msg!r}")
        want = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != want:
            raise ValueError(
                f"{where}, message {i}: role {msg['role']!r} where {want!r} was expected "
                "(turns alternate user / assistant, starting with user)"
            )
        if not isinstance(msg["content"], str):
            raise ValueError(
                f"{where}, message {i}: content must be a string, got {type(msg['content']).__name__}"
            )
