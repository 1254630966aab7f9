"""Learning-rate schedule: per-module linear warm-up, then cosine decay to ``min_lr_ratio``.

One ``LambdaLR`` drives every parameter group; each group follows the lambda of its module
(connector / vision / llm), so the connector can warm up in 200 steps while the LLM takes 2000.
The multiplier for optimizer step ``k`` (0-based) is ``(k + 1) / warmup`` during warm-up, then
``min + (1 - min) * (1 + cos(pi * progress)) / 2`` with ``progress`` going 0 -> 1 from the end of
warm-up to ``total_steps``; it stays at ``min`` afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from mmsmall.config import MODULES


def warmup_cosine(warmup: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at optimizer step ``k``."""
    warmup = max(0, int(warmup))

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        span = max(1, total_steps - warmup)
        progress = min(1.0, (k - warmup) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg, total_steps: int | None = None) -> LambdaLR:
    """A LambdaLR with one lambda per param group, chosen by the group's ``module`` key."""
    total = total_steps if total_steps is not None else train_cfg.steps
    lambdas = []
    for group in optimizer.param_groups:
        module = group.get("module")
        if module not in MODULES:
            raise ValueError(
                f"param group {group.get('name')!r} has no module key (one of {', '.join(MODULES)})"
            )
        lambdas.append(warmup_cosine(getattr(train_cfg.warmup, module), total, train_cfg.min_lr_ratio))
    return LambdaLR(optimizer, lambdas)
