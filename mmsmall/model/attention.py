"""Document-wise SDPA for packed rows: attention cost of sum(L_doc^2) instead of T^2 per row.

With ``model.llm.attn_implementation: sdpa_docwise`` the VLM does not hand the LLM a (B, 1, T, T)
mask. It regroups the documents of all packed rows by length (:func:`doc_groups`): each group is
a padded ``(n, L)`` batch of whole documents of similar length, with a small ``(n, 1, L, L)`` mask
that keeps the Molmo rule inside a document (causal, conversations see the shared prefix and
their own tokens, image tokens bidirectional). :func:`docwise_sdpa`, registered with transformers'
``AttentionInterface`` under :data:`DOCWISE`, gathers q / k / v into those groups, runs one SDPA
call per group and scatters the outputs back; padding tokens get zeros (no label reads them).

Tokens of different documents never meet, as with the block mask, but the masked-out blocks
between documents are not computed at all. This is what flash-attention's varlen kernels do for
plain causal documents; they cannot express the image and conversation blocks of the Molmo mask,
so the regrouped SDPA keeps that mask exactly. Without groups (KV-cached generation, or rows
whose documents are not contiguous) the function is plain SDPA with the 4D mask it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

DOCWISE = "sdpa_docwise"
# A document joins a group while its length is at least this fraction of the group's longest,
# so padded attention work per document is at most (1 / MIN_FILL)^2 of its own.
MIN_FILL = 0.75


@dataclass
class DocGroups:
    """Packed rows regrouped by document (see module docstring); built once per forward."""

    shape: tuple[int, int]  # (B, T) of the batch
    slots: list[torch.Tensor]  # per group (n, L) int64: flat index b * T + t of each slot (0 in padding)
    masks: list[torch.Tensor]  # per group (n, 1, L, L) bool, True = may attend
    src: torch.Tensor  # (R,) int64: real slots in the concatenated flattened groups
    dst: torch.Tensor  # (R,) int64: the flat batch position each of those came from


def _doc_of_tokens(
    attention_mask: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    shape: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """(B, T) int64 document of every token, -1 for padding (one document per row without doc_ids)."""
    doc = torch.zeros(shape, dtype=torch.long, device=device) if doc_ids is None else doc_ids.long()
    return doc if attention_mask is None else torch.where(attention_mask.bool(), doc, -1)


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    conv_ids: torch.Tensor | None,
    is_image: torch.Tensor | None,
    shape: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """The attention rule as a boolean (B, 1, T, T) mask, True = may attend.

    attention_mask (B, T) 1 real / 0 pad; doc_ids (B, T) with -1 for padding (derived from
    attention_mask when None); conv_ids (B, T) (all 0 when None); is_image (B, T) bool or None
    (no bidirectional image block). Query rows of padding see only themselves, so no softmax
    row is empty.
    """
    b, t = shape
    doc = _doc_of_tokens(attention_mask, doc_ids, shape, device)  # (B, T)
    conv = torch.zeros(b, t, dtype=torch.long, device=device) if conv_ids is None else conv_ids.long()
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] >= 0)  # (B, Tq, Tk)
    conv_ok = (conv[:, None, :] == 0) | (conv[:, None, :] == conv[:, :, None])  # (B, Tq, Tk)
    order = torch.arange(t, device=device)
    visible = (order[None, :] <= order[:, None])[None]  # (1, Tq, Tk) causal
    if is_image is not None:
        visible = visible | (is_image[:, :, None] & is_image[:, None, :])  # (B, Tq, Tk)
    allowed = same_doc & conv_ok & visible
    allowed = allowed | (torch.eye(t, dtype=torch.bool, device=device)[None] & (doc < 0)[:, :, None])
    return allowed[:, None]  # (B, 1, T, T)


def doc_groups(
    attention_mask: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    conv_ids: torch.Tensor | None,
    is_image: torch.Tensor | None,
    shape: tuple[int, int],
    device: torch.device,
    min_fill: float = MIN_FILL,
) -> DocGroups | None:
    """The documents of a batch regrouped by length; arguments as for :func:`build_attention_mask`.

    Returns None when a document is split into several runs of a row (the packer never does
    that); the caller then uses the full 4D mask.
    """
    b, t = shape
    doc = _doc_of_tokens(attention_mask, doc_ids, shape, device).flatten()  # (B*T,)
    pos = torch.arange(b * t, device=device)
    starts_run = torch.ones_like(doc, dtype=torch.bool)
    starts_run[1:] = (doc[1:] != doc[:-1]) | (pos[1:] % t == 0)
    run_start = pos[starts_run]  # (n_runs,) documents and padding alike
    run_end = torch.cat([run_start[1:], pos.new_tensor([b * t])])  # a run ends where the next begins
    is_doc = doc[run_start] >= 0
    run_start, run_end = run_start[is_doc], run_end[is_doc]  # (n_docs,)
    keys = torch.stack([run_start // t, doc[run_start]], 1)  # (n_docs, 2) row and doc id
    if len(keys) == 0 or len(torch.unique(keys, dim=0)) != len(keys):
        return None
    starts, lengths = run_start.tolist(), (run_end - run_start).tolist()
    order = sorted(range(len(starts)), key=lambda i: -lengths[i])
    conv = None if conv_ids is None else conv_ids.long().flatten()
    image = None if is_image is None else is_image.flatten()

    slots, masks, src, offset = [], [], [], 0
    i = 0
    while i < len(order):
        longest = lengths[order[i]]
        j = i
        while j < len(order) and lengths[order[j]] >= min_fill * longest:
            j += 1
        members = order[i:j]
        i = j
        start = torch.tensor([starts[k] for k in members], device=device)  # (n,)
        length = torch.tensor([lengths[k] for k in members], device=device)  # (n,)
        span = torch.arange(longest, device=device)  # (L,)
        valid = span[None] < length[:, None]  # (n, L)
        slot = torch.where(valid, start[:, None] + span[None], 0)  # (n, L)
        mask = build_attention_mask(
            valid.long(),
            None,
            None if conv is None else conv[slot],
            None if image is None else image[slot] & valid,
            tuple(slot.shape),
            device,
        )
        slots.append(slot)
        masks.append(mask)
        src.append(valid.flatten().nonzero().squeeze(1) + offset)
        offset += slot.numel()
    src_t = torch.cat(src)
    dst = torch.cat([s.flatten() for s in slots])[src_t]
    return DocGroups((b, t), slots, masks, src_t, dst)


def docwise_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    doc_groups: DocGroups | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, T, D), key / value (B, H_kv, T, D) -> (B, T, H, D)."""
    b, h, t, _ = query.shape
    if doc_groups is None or doc_groups.shape != (b, t) or key.shape[2] != t:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    d_v = value.shape[-1]

    def flat(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) -> (B*T, H, D)
        return x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3])

    q, k, v = flat(query), flat(key), flat(value)
    outs = []
    for slot, mask in zip(doc_groups.slots, doc_groups.masks, strict=True):
        n, length = slot.shape
        out, _ = sdpa_attention_forward(
            module,
            q[slot].transpose(1, 2),  # (n, H, L, D)
            k[slot].transpose(1, 2),
            v[slot].transpose(1, 2),
            mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=False,
        )  # (n, L, H, D_v)
        outs.append(out.reshape(n * length, h, d_v))
    real = torch.cat(outs)[doc_groups.src]  # (R, H, D_v)
    out = query.new_zeros(b * t, h, d_v).index_copy(0, doc_groups.dst, real)
    return out.view(b, t, h, d_v), None


AttentionInterface.register(DOCWISE, docwise_sdpa)
