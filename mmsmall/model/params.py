"""A parameter's full size and shape, also under ZeRO-3 (which leaves a 1-D slice in ``p`` and keeps
the full numbers in ``ds_numel`` / ``ds_shape``)."""

from __future__ import annotations

import torch


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))
