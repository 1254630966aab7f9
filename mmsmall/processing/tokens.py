"""Token layout: the image token block and the Molmo chat format.

Image block (the same string transformers' ``Molmo2Processor.replace_image_token`` builds):

    <low_res_im_start> (<im_patch> * low_w <im_col>) * low_h <im_end>
    <im_start>         (<im_patch> * high_w <im_col>) * high_h <im_end>

with ``image_grids = [low_h, low_w, high_h, high_w]`` counted in pooled tokens. Every
``<im_patch>`` receives one pooled image feature, in the order of ``image_token_pooling``.

Chat format: ``BOS`` + image block, then for each turn `` User: {question} Assistant:`` and the
answer `` {answer}`` + ``EOS``. With a style prefix the question becomes ``{task}: {question}``
(Molmo's ``chart_qa: ...``). Only answers and their EOS are trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

USER = " User:"
ASSISTANT = " Assistant:"


def _grid(image_grids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> tuple[int, int, int, int]:
    g = image_grids.tolist() if isinstance(image_grids, torch.Tensor) else list(image_grids)
    if len(g) == 1 and isinstance(g[0], (list, tuple)):
        g = list(g[0])
    if len(g) != 4:
        raise ValueError(f"image_grids must hold [low_h, low_w, high_h, high_w], got {image_grids!r}")
    low_h, low_w, high_h, high_w = (int(x) for x in g)
    return low_h, low_w, high_h, high_w


def image_token_string(
    image_grids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    *,
    use_col_tokens: bool = True,
    single_crop_col_tokens: bool | None = None,
    single_crop_start_token: bool = True,
) -> str:
    """The image token block for one image as text (defaults = Molmo2Processor's defaults)."""
    low_h, low_w, high_h, high_w = _grid(image_grids)
    low_col = use_col_tokens if single_crop_col_tokens is None else single_crop_col_tokens
    low_row = "<im_patch>" * low_w + ("<im_col>" if low_col else "")
    high_row = "<im_patch>" * high_w + ("<im_col>" if use_col_tokens else "")
    start = "<low_res_im_start>" if single_crop_start_token else "<im_start>"
    return f"{start}{low_row * low_h}<im_end><im_start>{high_row * high_h}<im_end>"


def image_token_ids(
    image_grids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    ids: dict[str, int],
    *,
    use_col_tokens: bool = True,
    single_crop_col_tokens: bool | None = None,
    single_crop_start_token: bool = True,
) -> torch.Tensor:
    """The same block as token ids ``(n,)`` int64, built without the tokenizer.

    ``ids`` maps token strings to ids (:func:`mmsmall.processing.tokenizer.special_ids`).
    """
    low_h, low_w, high_h, high_w = _grid(image_grids)
    low_col = use_col_tokens if single_crop_col_tokens is None else single_crop_col_tokens
    patch, col = ids["<im_patch>"], ids["<im_col>"]

    def rows(h: int, w: int, with_col: bool) -> np.ndarray:
        row = np.full(w + int(with_col), patch, dtype=np.int64)  # (w [+1],)
        if with_col:
            row[-1] = col
        return np.tile(row, h)  # (h * (w [+1]),)

    start = ids["<low_res_im_start>"] if single_crop_start_token else ids["<im_start>"]
    parts = [
        [start],
        rows(low_h, low_w, low_col),
        [ids["<im_end>"], ids["<im_start>"]],
        rows(high_h, high_w, use_col_tokens),
        [ids["<im_end>"]],
    ]
    return torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))


def user_text(question: str, task: str | None = None, style_prefix: bool = False) -> str:
    """`` User: {question} Assistant:``, with ``{task}: `` before the question when styled."""
    if style_prefix and task:
        question = f"{task}: {question}"
    return f"{USER} {question}{ASSISTANT}"


def answer_text(answer: str) -> str:
    """The answer as it follows `` Assistant:`` (a leading space; EOS is added as a token)."""
    return answer if answer[:1].isspace() else f" {answer}"
