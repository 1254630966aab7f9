"""Model FLOPs of a training step (useful tokens only) and the device peak, for the MFU estimate.

Per useful (non-pad) LLM token: ``k * N_llm`` for the matmuls (``k`` = 6 when the LLM trains,
4 when it is frozen but gradients flow through it to the connector), where ``N_llm`` leaves out
the LM head: training runs the head only where a target follows (``keep_logits=False``), so it
counts ``k * N_head`` per target token, work done rather than work skipped. Then causal attention,
``k * n_layers * d * len`` summed per packed document (``len`` = its token count, so the cost
is ``k * L * d * sum(len^2) / 2`` with ``k/2`` for the causal half). Per crop of the vision tower:
``k * N_vision * n_patches`` plus its full attention ``2 * k * L * d * n_patches^2``, with
``k`` = 6 when the tower trains and 2 when frozen (no backward through it). Embedding tables
are left out of ``N``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmsmall.model.params import full_numel
from mmsmall.processing.batch import count_targets

# Dense bf16 peak FLOP/s without sparsity, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def _dense_params(module: nn.Module) -> int:
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            continue
        for p in m.parameters(recurse=False):
            n += full_numel(p)
    return n


class FlopCounter:
    """``step_flops(batch)`` for one model; counts once at construction."""

    def __init__(self, model: nn.Module, freeze: list[str]):
        llm_cfg = model.llm.config
        head = model.llm.get_output_embeddings()
        self.n_head = _dense_params(head)
        self.n_llm = _dense_params(model.llm) - self.n_head
        self.n_vis = _dense_params(model.vision) + _dense_params(model.connector)
        self.L, self.d = llm_cfg.num_hidden_layers, llm_cfg.hidden_size
        self.k_llm = 6 if "llm" not in freeze else 4
        self.k_vis = 6 if "vision" not in freeze else 2
        self.L_vis = int(getattr(model.vision, "num_blocks", 0))  # blocks kept after pruning
        self.d_vis = int(getattr(model.vision, "hidden_size", 0))

    def step_flops(self, batch: dict[str, Any]) -> float:
        doc = batch["doc_ids"]  # (B, T), -1 = pad
        useful = int((doc >= 0).sum())
        # tokens per (row, doc): bincount over row * (max_doc + 1) + doc
        width = int(doc.max()) + 1 if useful else 1
        flat = (torch.arange(doc.shape[0]).unsqueeze(1) * width + doc)[doc >= 0]
        sq = float((torch.bincount(flat).double() ** 2).sum())
        targets = int(count_targets(batch["labels"]))
        flops = self.k_llm * (self.n_llm * useful + self.n_head * targets)
        flops += self.k_llm * self.L * self.d * sq / 2
        pv = batch.get("pixel_values")
        if pv is not None:
            n_crops, P = pv.shape[0], pv.shape[1]
            flops += self.k_vis * self.n_vis * n_crops * P
            flops += 2 * self.k_vis * self.L_vis * self.d_vis * n_crops * P * P
        return float(flops)


def peak_flops() -> float | None:
    """Peak dense bf16 FLOP/s of the local GPU, or None (CPU / unknown GPU: no MFU shown)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
