"""Prompts through a checkpoint's own chat template (``model.prompt: chat_template``).

A released model is prompted the way it was trained: its tokenizer's chat template renders the
turn (stock Molmo2: the image first, then ``<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``)
and transformers' ``Molmo2Processor`` expands the image into crops and image tokens. The result is
an Example in :mod:`mmsmall.processing.processor`'s layout, so ``collate(left_pad=True)`` batches it
and ``VLM.generate`` decodes it exactly like a prompt of ours.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from mmsmall.config import ImageConfig
from mmsmall.processing.batch import IGNORE_INDEX
from mmsmall.processing.processor import Example, ImageInput, as_images


def require_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    """Refuse a tokenizer without a chat template (``model.prompt=chat_template`` needs one)."""
    if not tokenizer.chat_template:
        raise ValueError(
            "model.prompt=chat_template but the tokenizer has no chat template; import the checkpoint "
            "with `mmsmall import` (it copies the template) or set model.prompt=mmsmall"
        )


class ChatTemplateProcessor:
    """``encode_prompt`` through ``tokenizer.chat_template`` and the stock Molmo2 processor.

    Args:
        tokenizer: holding the checkpoint's chat template.
        image_cfg: crops (``max_crops_eval``), crop / patch size, margins, pooling, mean / std.
        style_prefix: put ``{task}: `` before questions (Molmo task styles), as ours does.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, image_cfg: ImageConfig, style_prefix: bool = False
    ):
        from mmsmall.export.molmo2 import build_molmo2_processor

        require_chat_template(tokenizer)
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg
        self.style_prefix = style_prefix
        self.hf_processor = build_molmo2_processor(tokenizer, image_cfg, tokenizer.chat_template)

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
        )
        ids = enc["input_ids"][0]  # (T,)
        return template_example(enc, torch.full_like(ids, IGNORE_INDEX), bool(images), sample_id)


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
