"""What every batch shares: the label ignore index and the count of trained targets."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a label that is not trained (prompt, image tokens, padding): cross_entropy's default


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """() int64: labels trained after the next-token shift (``labels[:, 1:]``), of a (B, T) batch."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
