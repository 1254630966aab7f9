"""Perceptual hashes and a multi-index for Hamming-radius search over 64-bit hashes.

pHash: grayscale 32x32 thumbnail, 2D DCT-II, the 8x8 lowest frequencies compared with their
median -> 64 bits (computed for a whole batch with two matrix products).

Index (pigeonhole): split the 64 bits into ``m`` bands. Two hashes within ``k`` bits differ in at
most ``k`` bands, so at least ``m - k`` bands agree exactly. For every combination of ``m - k``
bands the index keeps the hashes sorted by those bands' bits; a query looks up its exact bucket
in each table (``searchsorted``) and verifies the candidates with a popcount. With the default
``m = k + 2`` each table key has about ``2 * 64 / (k + 2)`` bits, so at a million random hashes a
bucket holds a handful of entries instead of the whole set.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

HASH_SIZE = 8
_IMG = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n)).astype(np.float32)  # (n, n), DCT-II rows


_D = _dct_matrix(_IMG)[:HASH_SIZE]  # (8, 32) only the low frequencies are needed
_BITS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)  # (64,) MSB first


def phash_thumb(im: Image.Image) -> np.ndarray:
    """The (32, 32) float32 grayscale thumbnail pHash is computed from."""
    g = im.convert("L")
    if g.width > 4 * _IMG and g.height > 4 * _IMG:
        g = g.reduce(max(1, min(g.width, g.height) // (2 * _IMG)))  # fast box pre-shrink
    return np.asarray(g.resize((_IMG, _IMG), Image.Resampling.BILINEAR), dtype=np.float32)


def phash_batch(thumbs: np.ndarray) -> np.ndarray:
    """(N, 32, 32) thumbnails -> (N,) uint64 hashes."""
    if len(thumbs) == 0:
        return np.zeros(0, dtype=np.uint64)
    low = _D @ thumbs @ _D.T  # (N, 8, 8) lowest DCT frequencies
    flat = low.reshape(len(thumbs), -1)  # (N, 64)
    bits = flat > np.median(flat, axis=1, keepdims=True)  # (N, 64)
    return (bits.astype(np.uint64) * _BITS).sum(axis=1, dtype=np.uint64)


def phash(im: Image.Image) -> int:
    """64-bit perceptual hash of one image."""
    return int(phash_batch(phash_thumb(im)[None])[0])


def hex64(h: int) -> str:
    return f"{int(h):016x}"


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise popcount of ``a ^ b`` for uint64 arrays."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def _band_edges(m: int) -> np.ndarray:
    return np.linspace(0, 64, m + 1).round().astype(int)  # (m + 1,) bit offsets from the MSB


def _ragged_pairs(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [starts[q], ends[q]): (owner q, position) of every element, vectorized."""
    counts = ends - starts
    owner = np.repeat(np.arange(len(starts)), counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, np.repeat(starts, counts) + offset


class _Table:
    """Hashes sorted by the concatenated bits of some bands, with a bucket lookup.

    The key (the chosen bands' bits packed together, ``bits`` wide) is small, so buckets are
    found through a dense offsets array when ``2**bits`` is at most twice the count, otherwise
    by binary search on the packed keys. Candidates are then a contiguous run of ``sorted``.
    """

    def __init__(self, hashes: np.ndarray, spans: list[tuple[int, int]]):
        self.spans = spans  # (start, end) bit offsets from the MSB of each band
        self.bits = sum(b - a for a, b in spans)
        keys = self.key(hashes)
        self.order = np.argsort(keys, kind="stable").astype(np.int32 if len(hashes) < 2**31 else np.int64)
        self.sorted = hashes[self.order]  # (N,) uint64, contiguous per bucket
        keys = keys[self.order]
        self.offsets = None
        if 2**self.bits <= max(2 * len(hashes), 1024):
            self.offsets = np.searchsorted(keys, np.arange(2**self.bits + 1, dtype=np.uint64))
            self.keys = None
        else:
            self.keys = keys.astype(np.uint32) if self.bits <= 32 else keys

    def key(self, h: np.ndarray) -> np.ndarray:
        return table_key(h, self.spans)

    def buckets(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) positions in ``sorted`` of the bucket of each hash in ``h``."""
        k = self.key(h)
        if self.offsets is not None:
            return self.offsets[k], self.offsets[k + np.uint64(1)]
        k = k.astype(self.keys.dtype)
        return np.searchsorted(self.keys, k, side="left"), np.searchsorted(self.keys, k, side="right")

    def sorted_keys(self) -> np.ndarray:
        return self.key(self.sorted)


class NearDupIndex:
    """Find stored 64-bit hashes within ``max_distance`` bits of a query.

    >>> idx = NearDupIndex(hashes, max_distance=4)        # hashes: (N,) uint64
    >>> q, i, d = idx.query(queries)                       # matches: query row, stored row, distance
    >>> a, b = idx.self_pairs()                            # all pairs a < b within the radius
    """

    def __init__(self, hashes: np.ndarray, max_distance: int = 4, bands: int = 0):
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.k = int(max_distance)
        self.tables = [_Table(self.hashes, spans) for spans in table_spans(self.k, bands)]

    def __len__(self) -> int:
        return len(self.hashes)

    def query(self, queries: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (query row, stored row, distance) with distance <= max_distance, unique, sorted."""
        queries = np.asarray(queries, dtype=np.uint64)
        out_q, out_i = [], []
        for c0 in range(0, len(queries), chunk):
            qs = queries[c0 : c0 + chunk]
            for t in self.tables:
                owner, pos = _ragged_pairs(*t.buckets(qs))
                ok = hamming(qs[owner], t.sorted[pos]) <= self.k
                out_q.append(owner[ok] + c0)
                out_i.append(t.order[pos[ok]].astype(np.int64))
        if not out_q:
            e = np.zeros(0, dtype=np.int64)
            return e, e, e
        n = max(len(self.hashes), 1)
        q, i = np.divmod(np.unique(np.concatenate(out_q) * n + np.concatenate(out_i)), n)
        return q, i, hamming(queries[q], self.hashes[i])

    def self_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored pairs (a, b), a < b, within max_distance, unique and sorted by (b, a)."""
        return _unique_pairs([_bucket_pairs(t, self.k) for t in self.tables], len(self.hashes))


def table_key(h: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """(N,) uint64: the bits of the bands ``spans`` of each hash, packed together."""
    key = np.zeros(len(h), dtype=np.uint64)
    for a, b in spans:
        band = (h >> np.uint64(64 - b)) & np.uint64((1 << (b - a)) - 1)
        key = (key << np.uint64(b - a)) | band
    return key


def table_spans(max_distance: int, bands: int = 0) -> list[list[tuple[int, int]]]:
    """The band spans of every index table: each combination of ``m - k`` of the ``m`` bands."""
    k = int(max_distance)
    m = bands or k + 2
    if m <= k:
        raise ValueError(f"NearDupIndex: bands={m} must exceed max_distance={k}")
    edges = _band_edges(m)
    return [
        [(int(edges[c]), int(edges[c + 1])) for c in combo]
        for combo in itertools.combinations(range(m), m - k)
    ]


def self_pairs(hashes: np.ndarray, max_distance: int = 4, bands: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``NearDupIndex(hashes, max_distance, bands).self_pairs()`` holding one table at a time.

    Same pairs, but the peak memory is the hashes plus one table (about 30 bytes per hash) instead of
    every table at once (``C(m, k)`` of them: 28 at the defaults).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    found = [bucket_pairs(hashes, spans, max_distance) for spans in table_spans(max_distance, bands)]
    return _unique_pairs(found, len(hashes))


def bucket_pairs(
    hashes: np.ndarray, spans: list[tuple[int, int]], max_distance: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b) within ``max_distance`` bits that share a bucket of the table over ``spans``."""
    return _bucket_pairs(_Table(np.ascontiguousarray(hashes, dtype=np.uint64), spans), int(max_distance))


def _bucket_pairs(t: _Table, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a < b) of one table's buckets within ``k`` bits, in stored-row numbers."""
    n = len(t.sorted)
    e = np.zeros(0, dtype=np.int64)
    if n < 2:
        return e, e
    keys = t.sorted_keys()  # (N,) nondecreasing
    new_bucket = np.r_[True, keys[1:] != keys[:-1]]  # (N,)
    ends = np.r_[np.flatnonzero(new_bucket)[1:], n]  # end of each bucket
    p = np.flatnonzero(~new_bucket[1:])  # positions whose successor shares the bucket
    if len(p) == 0:
        return e, e
    bucket_end = ends[np.cumsum(new_bucket)[p] - 1]
    owner, q = _ragged_pairs(p + 1, bucket_end)
    ok = hamming(t.sorted[p[owner]], t.sorted[q]) <= k
    a, b = t.order[p[owner][ok]].astype(np.int64), t.order[q[ok]].astype(np.int64)
    return np.minimum(a, b), np.maximum(a, b)


def _unique_pairs(found: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-table pairs: unique, sorted by (b, a)."""
    found = [(a, b) for a, b in found if len(a)]
    if not found:
        e = np.zeros(0, dtype=np.int64)
        return e, e
    b, a = np.divmod(
        np.unique(np.concatenate([b for _, b in found]) * n + np.concatenate([a for a, _ in found])), n
    )
    return a, b


def greedy_keep(n: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walk samples in order; drop b if an earlier *kept* a is within the radius.

    Returns ``(keep (n,) bool, dup_of (n,) int64, -1 where kept)``. Pairs must have a < b.
    """
    keep = np.ones(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    order = np.lexsort((a, b))
    for ai, bi in zip(a[order].tolist(), b[order].tolist()):
        if keep[bi] and keep[ai]:
            keep[bi] = False
            dup_of[bi] = ai
    return keep, dup_of


def pages_of(cand: dict) -> list[tuple[str, str]]:
    """(sha256, pHash hex) of each image of a curation candidate record, in order (see curate.py)."""
    return [tuple(p) for p in cand["pages"]] if cand.get("pages") else [(cand["sha256"], cand["phash"])]


def near_detail(cand: dict, other: dict) -> str:
    """Why ``cand`` is a near duplicate of ``other``: the closest pair of their images."""
    dist = min(bin(int(a, 16) ^ int(b, 16)).count("1") for _, a in pages_of(cand) for _, b in pages_of(other))
    return f"pHash within {dist} bits of {other['id']}"


def greedy_groups(owner: np.ndarray, group: np.ndarray) -> tuple[list[int], list[int]]:
    """Exact dedup of samples that hold several images: walk the samples in order; a sample one of
    whose groups (images with the same bytes) an earlier *kept* sample holds is dropped, else it keeps
    and holds all its groups. Two equal images inside one sample do not drop it.

    ``owner (P,)``: the sample of each image; ``group (P,)``: its group id. Returns (dropped samples,
    ascending; for each, the earliest kept sample it repeats). With one image per sample this is
    "the first occurrence of each sha256 stays".
    """
    order = np.lexsort((group, owner))
    owner_l, group_l = owner[order].tolist(), group[order].tolist()
    holder: dict[int, int] = {}
    dup, of = [], []
    i = 0
    while i < len(owner_l):
        j = i
        while j < len(owner_l) and owner_l[j] == owner_l[i]:
            j += 1
        c, groups = owner_l[i], group_l[i:j]
        hit = min((holder[g] for g in groups if g in holder), default=None)
        if hit is not None:
            dup.append(c)
            of.append(hit)
        else:
            holder.update((g, c) for g in groups)
        i = j
    return dup, of
