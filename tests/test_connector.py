"""Connector: same math as transformers' Molmo2Adapter, padding masked, window order irrelevant."""

from __future__ import annotations

import torch
from transformers.models.molmo2.configuration_molmo2 import Molmo2AdapterConfig
from transformers.models.molmo2.modeling_molmo2 import Molmo2Adapter

from mmsmall.model.connector import Connector

D, LAYERS, HEADS, HIDDEN, OUT = 16, 2, 4, 24, 12


def _pooling(n_crops: int, grid: int, pool: int = 2) -> torch.Tensor:
    """(n_crops * (ceil(grid/pool))^2, pool*pool) window indices with -1 past the grid edge."""
    rows = []
    n_win = -(-grid // pool)
    for c in range(n_crops):
        for wy in range(n_win):
            for wx in range(n_win):
                slot = []
                for dy in range(pool):
                    for dx in range(pool):
                        y, x = wy * pool + dy, wx * pool + dx
                        slot.append(c * grid * grid + y * grid + x if y < grid and x < grid else -1)
                rows.append(slot)
    return torch.tensor(rows)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 25, D * LAYERS, generator=g)  # 2 crops of 5x5 patches
    pooling = _pooling(2, 5)  # (18, 4): the last row/column of windows is partly padded
    pooling = torch.cat([pooling, torch.full((1, 4), -1)])  # plus one fully padded window
    return feats, pooling


def _connector(pad_embed: bool = False) -> Connector:
    torch.manual_seed(0)
    conn = Connector(D, LAYERS, HEADS, HIDDEN, OUT, pad_embed=pad_embed)
    with torch.no_grad():  # non-zero biases so that the comparison covers them
        for p in conn.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return conn


def test_matches_transformers_molmo2_adapter():
    conn = _connector()
    cfg = Molmo2AdapterConfig(
        vision_feature_layer=list(range(LAYERS)),
        hidden_size=D,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=D // HEADS,
        intermediate_size=HIDDEN,
        text_hidden_size=OUT,
        attention_bias=True,
        mlp_bias=False,
    )
    cfg._attn_implementation = "eager"
    ref = Molmo2Adapter(cfg).eval()
    ref.load_state_dict(conn.state_dict())  # strict: the parameter names are Molmo2's
    feats, pooling = _inputs()
    with torch.no_grad():
        ours = conn(feats, pooling)
        theirs = ref(feats, pooling).last_hidden_state
    assert ours.shape == (18, OUT)  # the fully padded window is dropped
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_window_slot_permutation_invariance():
    conn = _connector()
    feats, pooling = _inputs()
    g = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(4, generator=g) for _ in range(pooling.shape[0])])
    shuffled = pooling.gather(1, perm)
    with torch.no_grad():
        torch.testing.assert_close(conn(feats, pooling), conn(feats, shuffled), rtol=1e-5, atol=1e-6)


def test_padding_is_masked():
    conn = _connector()
    feats, pooling = _inputs()
    # Patches no window refers to cannot change anything (crop 1 keeps only its first window).
    keep = pooling.clone()
    keep[10:] = -1
    keep[9] = torch.tensor([25, 26, -1, -1])
    changed = feats.clone()
    changed[1, 2:] += 100.0  # every patch of crop 1 except 25 and 26 (flat indices)
    with torch.no_grad():
        a, b = conn(feats, keep), conn(changed, keep)
    assert a.shape == (10, OUT)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A window of one valid patch equals that patch pooled alone: padding neither dilutes the query
    # nor takes attention weight.
    single = torch.tensor([[7, -1, -1, -1]])
    alone = torch.tensor([[7, 7, 7, 7]])
    with torch.no_grad():
        torch.testing.assert_close(conn(feats, single), conn(feats, alone), rtol=1e-5, atol=1e-6)


def test_pad_embed_fills_padded_slots_only():
    conn = _connector(pad_embed=True)
    feats, pooling = _inputs()
    plain = _connector(pad_embed=False)
    plain.load_state_dict({k: v for k, v in conn.state_dict().items() if k != "pad_embed"})
    with torch.no_grad():
        a, b = conn(feats, pooling), plain(feats, pooling)
    full_rows = (pooling >= 0).all(-1)[:18]  # windows without padding are untouched by pad_embed
    torch.testing.assert_close(a[full_rows], b[full_rows], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a[~full_rows], b[~full_rows])
    conn(feats, pooling).sum().backward()
    assert conn.pad_embed.grad is not None and conn.pad_embed.grad.abs().sum() > 0
