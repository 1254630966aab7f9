"""Connector: attention-pool each patch window, then a SwiGLU projection to the LLM width.

Same parameter names and math as transformers' ``Molmo2Adapter``, so that a checkpoint maps 1:1:

    image_pooling_2d.{q,k,v,o}_proj   multi-head attention; query = mean of the window's valid
                                      patches, keys/values = the window's patches (padding masked)
    image_projector.{gate,up,down}_proj   down(silu(gate(x)) * up(x)), no biases

``pooling`` indices ``(M, K)`` point into the flattened ``(N*P)`` patches of all crops; ``-1``
marks a padded slot. Windows without any valid patch are dropped from the output, as Molmo2 does.

Optional ``pad_embed`` (Molmo 1 style, off by default; stock Molmo2 has none): a learned vector
that fills the padded (``-1``) slots of a window, which are then attended to like real patches
instead of being masked, so the model can tell an edge window from an interior one. The query
stays the mean of the valid patches. Molmo2's preprocessing resizes without letterboxing, so
``-1`` slots are the only image padding there is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PoolingAttention(nn.Module):
    """Cross-attention from one query per window to the window's K patches (Molmo2's q/k/v/o layout)."""

    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(in_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(in_dim, num_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(in_dim, num_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, out_dim, bias=bias)

    def forward(self, query: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query (M, 1, C), kv (M, K, C), mask (M, K) bool (True = attend) -> (M, out_dim)."""
        m, k, _ = kv.shape
        q = self.q_proj(query).view(m, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (M, H, 1, hd)
        key = self.k_proj(kv).view(m, k, self.num_heads, self.head_dim).transpose(1, 2)  # (M, H, K, hd)
        val = self.v_proj(kv).view(m, k, self.num_heads, self.head_dim).transpose(1, 2)  # (M, H, K, hd)
        # A window with no valid patch would softmax over nothing; let it see all (zeroed) slots, as
        # transformers' bidirectional mask does for fully padded rows. Such windows are dropped later.
        mask = mask | ~mask.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, key, val, attn_mask=mask[:, None, None, :])  # (M, H, 1, hd)
        return self.o_proj(out.transpose(1, 2).reshape(m, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); Molmo2ImageProjectorMLP without biases."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(in_dim, hidden, bias=False)
        self.up_proj = nn.Linear(in_dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Connector(nn.Module):
    """Molmo2-style adapter from concatenated ViT layers to LLM embeddings.

    Args:
        in_dim: feature width of one ViT layer (``VisionTower.hidden_size``).
        num_layers: how many layers are concatenated (input width = in_dim * num_layers).
        num_heads: pooling attention heads; head_dim = in_dim // num_heads (Molmo2 pools in
            the ViT's own width: hidden_size == ViT hidden_size).
        mlp_hidden: SwiGLU hidden width.
        out_dim: LLM hidden size.
        pad_embed: learned padding embeddings (Molmo 1 style).
    """

    def __init__(
        self,
        in_dim: int,
        num_layers: int,
        num_heads: int,
        mlp_hidden: int,
        out_dim: int,
        pad_embed: bool = False,
    ):
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(
                f"model.connector.pool_heads={num_heads} does not divide the vision width {in_dim}; "
                "choose a divisor (0 = the vision tower's head count)"
            )
        self.in_dim, self.num_layers, self.out_dim = in_dim, num_layers, out_dim
        feat_dim = in_dim * num_layers
        self.image_pooling_2d = PoolingAttention(feat_dim, num_heads, in_dim // num_heads, in_dim)
        self.image_projector = SwiGLU(in_dim, mlp_hidden, out_dim)
        # (feat_dim,) filler for padded slots; zero-initialised.
        self.pad_embed = nn.Parameter(torch.zeros(feat_dim)) if pad_embed else None

    def forward(self, features: torch.Tensor, pooling: torch.Tensor) -> torch.Tensor:
        """features (N, P, C), pooling (M, K) int64 with -1 padding -> (M_valid, out_dim)."""
        flat = features.reshape(-1, features.shape[-1])  # (N*P, C)
        if pooling.numel() and int(pooling.max()) >= flat.shape[0]:
            raise IndexError(
                f"image_token_pooling refers to patch {int(pooling.max())} but the batch has only "
                f"{flat.shape[0]} patches ({features.shape[0]} crops x {features.shape[1]}); the pooling "
                "indices must be offset into the batch's concatenated crops (processor.collate does this)"
            )
        valid = pooling >= 0  # (M, K)
        windows = flat[pooling.clamp(min=0)] * valid[..., None].to(flat.dtype)  # (M, K, C)
        n_valid = valid.sum(-1).clamp(min=1).to(flat.dtype)  # (M,)
        query = windows.sum(1, keepdim=True) / n_valid[:, None, None]  # (M, 1, C)
        attend = valid
        if self.pad_embed is not None:  # padded slots carry the learned filler and are attended to
            windows = windows + (~valid)[..., None].to(flat.dtype) * self.pad_embed.to(flat.dtype)
            attend = valid | valid.any(-1, keepdim=True)
        pooled = self.image_pooling_2d(query, windows, attend)  # (M, in_dim)
        pooled = self.image_projector(pooled)  # (M, out_dim)
        return pooled[valid.any(-1)]  # (M_valid, out_dim)
