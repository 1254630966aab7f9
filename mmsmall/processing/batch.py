"""The batch: the one builder of model inputs, its key types, the label ignore index, the target count.

``collate_rows`` builds every batch: training rows of packed examples (padded right, optionally
to a fixed length) and generation batches of one example per row (``collate``, padded left).
Batch keys (docs/INTERFACES.md): token tensors ``input_ids labels attention_mask position_ids
doc_ids conv_ids`` (B, T); ``pixel_values`` (N, P, C), every crop in row order; ``image_token_pooling``
(M, K), indices into the flattened N * P patches (-1 = padding); ``image_grids`` (n_images, 4);
``sample_ids`` (one per example).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch

IGNORE_INDEX = -100  # a label that is not trained (prompt, image tokens, padding): cross_entropy's default
TOKEN_KEYS = ("input_ids", "labels", "position_ids", "conv_ids")  # per-token tensors of an Example

# what VLM.forward reads of a Batch (the rest, sample_ids and image_grids, is bookkeeping)
MODEL_KEYS = (
    *TOKEN_KEYS, "attention_mask", "doc_ids", "pixel_values", "image_token_pooling", "label_weights"
)  # fmt: skip


class Example(TypedDict, total=False):
    """One encoded sample (what a Processor returns)."""

    input_ids: torch.Tensor  # (T,) int64
    labels: torch.Tensor  # (T,) int64, IGNORE_INDEX where not trained
    position_ids: torch.Tensor  # (T,) int64
    conv_ids: torch.Tensor  # (T,) int64, 0 = the shared prefix
    pixel_values: torch.Tensor  # (n_crops, n_patches, 3 * patch^2), with an image
    image_token_pooling: torch.Tensor  # (n_image_tokens, K) int64 patch indices, -1 = none
    image_grids: torch.Tensor  # (1, 4) int64
    sample_id: str
    ref: tuple  # (shard, member) where training read it


class Batch(TypedDict, total=False):
    """Model inputs of several examples (see the module docstring and docs/INTERFACES.md)."""

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 real / 0 padding
    position_ids: torch.Tensor  # (B, T)
    doc_ids: torch.Tensor  # (B, T) packed document per token, -1 = padding
    conv_ids: torch.Tensor  # (B, T)
    pixel_values: torch.Tensor | None  # (N, P, C) every crop in row order
    image_token_pooling: torch.Tensor | None  # (M, K) into the flattened N * P patches
    image_grids: torch.Tensor  # (n_images, 4)
    sample_ids: list[str]
    label_weights: torch.Tensor  # (B, T) float32 loss weight of each label (train.loss_weighting)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """() int64: labels trained after the next-token shift (``labels[:, 1:]``), of a (B, T) batch."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def label_weights(batch: Batch, power: float) -> torch.Tensor:
    """(B, T) float32: each label of a conversation with n trained labels weighs ``n ** -power``
    (0 where not trained). A conversation is one (row, packed document, conv_ids) triple, so
    the conversations packed into one row and those sharing an image are weighed apart; the
    counts are taken after the next-token shift, as :func:`count_targets` counts."""
    labels = batch["labels"]
    B, T = labels.shape
    trained = torch.zeros_like(labels, dtype=torch.bool)
    trained[:, 1:] = labels[:, 1:] != IGNORE_INDEX
    docs = batch["doc_ids"].clamp(min=0)
    convs = batch["conv_ids"]
    rows = torch.arange(B)[:, None].expand(B, T)
    key = (rows * (int(docs.max()) + 1) + docs) * (int(convs.max()) + 1) + convs  # (B, T) conversation
    _, group = torch.unique(key[trained], return_inverse=True)
    n = torch.bincount(group).to(torch.float32)  # trained labels per conversation
    weights = torch.zeros((B, T), dtype=torch.float32)
    weights[trained] = n[group] ** -power
    return weights


def loss_normalizer(batch: Batch) -> float:
    """What a micro-batch adds to the loss's denominator: its target count, or with
    ``label_weights`` the sum of its targets' weights (the model sums weighted token losses)."""
    w = batch.get("label_weights")
    return float(count_targets(batch["labels"])) if w is None else float(w[:, 1:].sum())


def model_inputs(batch: Batch) -> Batch:
    """The keys of ``batch`` the model takes (:data:`MODEL_KEYS`)."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def example_len(ex: Example) -> int:
    return int(ex["input_ids"].shape[0])


def collate(examples: Sequence[Example], pad_id: int, left_pad: bool = False) -> Batch:
    """One Example per row -> a Batch, padded right (training) or left (generation)."""
    if not examples:
        raise ValueError("collate: no examples")
    return collate_rows([[ex] for ex in examples], pad_id, left_pad=left_pad)


def collate_rows(
    rows: Sequence[Sequence[Example]], pad_id: int, seq_len: int | None = None, left_pad: bool = False
) -> Batch:
    """Rows of examples (a packed row holds several documents) -> Batch, each row padded to
    ``seq_len`` (or the longest row): on the right, or on the left (``left_pad``) for generation.

    ``doc_ids`` number the documents of a row from 0 (-1 = padding); the pooling indices of each
    image are offset by the patches of every image before it, in row order."""
    lengths = [sum(example_len(e) for e in row) for row in rows]
    T = seq_len if seq_len is not None else max(lengths, default=0)
    if max(lengths, default=0) > T:
        raise ValueError(f"a packed row holds {max(lengths)} tokens, more than seq_len={T}")
    B = len(rows)
    out: Batch = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
        "position_ids": torch.zeros((B, T), dtype=torch.long),
        "doc_ids": torch.full((B, T), -1, dtype=torch.long),
        "conv_ids": torch.zeros((B, T), dtype=torch.long),
    }
    pixels, pooling, grids, sample_ids = [], [], [], []
    n_patches = 0  # running count of flattened patches: N_so_far * P
    for b, row in enumerate(rows):
        t = T - lengths[b] if left_pad else 0
        for d, ex in enumerate(row):
            L = example_len(ex)
            for k in TOKEN_KEYS:
                out[k][b, t : t + L] = ex[k]
            out["attention_mask"][b, t : t + L] = 1
            out["doc_ids"][b, t : t + L] = d
            t += L
            sample_ids.append(str(ex.get("sample_id", "")))
            pv = ex.get("pixel_values")
            if pv is not None:
                pool = ex["image_token_pooling"]  # (n_tok, K), -1 = padding
                pooling.append(torch.where(pool >= 0, pool + n_patches, pool))
                pixels.append(pv)  # (n_crops, P, C)
                n_patches += pv.shape[0] * pv.shape[1]
                if ex.get("image_grids") is not None:
                    grids.append(ex["image_grids"])
    out["pixel_values"] = torch.cat(pixels) if pixels else None  # (N, P, C)
    out["image_token_pooling"] = torch.cat(pooling) if pooling else None  # (M, K)
    if grids:
        out["image_grids"] = torch.cat(grids)  # (n_images, 4)
    out["sample_ids"] = sample_ids
    return out
