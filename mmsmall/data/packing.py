"""Sequence packing: Processor Examples -> rows of ``seq_len`` tokens -> one Batch.

A row holds whole examples one after another (an example is never split); each keeps its own
``position_ids`` (they restart at 0 for every example) and gets a ``doc_ids`` number inside the
row, so the model's mask keeps attention inside each example. Padding fills the rest of the row
(``doc_ids`` -1, ``labels`` IGNORE_INDEX (-100), ``attention_mask`` 0).

The ``Packer`` fills the ``B`` rows of one micro-batch best-fit (each example goes to the fullest
row it still fits in) from the examples it carried over plus new ones it pulls, until every row
is nearly full or it holds ``max_pending`` examples it could not place; those carry over to the
next batch. An example longer than ``seq_len`` is skipped (counted as ``too_long`` and logged,
not an error: one overlong document must not stop a run).

Batch keys (docs/INTERFACES.md): ``input_ids labels attention_mask position_ids doc_ids conv_ids
(B, T)``, ``pixel_values (N, P, C)`` every crop of the batch in row-major token order (None when
no example has an image), ``image_token_pooling (M, K)`` offset into the flattened ``N*P``
patches (-1 kept), ``image_grids (n_images, 4)`` when the examples have them, ``sample_ids``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mmsmall.processing.batch import Batch, Example, collate_rows, example_len  # noqa: F401  (the batch builder)

log = logging.getLogger(__name__)


class Packer:
    """Best-fit packing of a stream of Examples into micro-batches of ``rows`` x ``seq_len``.

    ``pack=False`` gives the padded baseline instead: one example per row, rows padded to the
    longest example of the batch.
    """

    def __init__(
        self,
        seq_len: int,
        rows: int,
        pad_id: int,
        *,
        pack: bool = True,
        max_pending: int | None = None,
        counters: dict[str, int] | None = None,
    ):
        self.seq_len, self.rows, self.pad_id, self.pack = int(seq_len), int(rows), int(pad_id), pack
        self.max_pending = max_pending if max_pending is not None else 8 * self.rows
        self.counters = counters if counters is not None else {}
        self.pending: list[Example] = []  # examples pulled but not yet placed, in pull order
        self.min_len = seq_len  # shortest example seen: a row with less free space is "full"
        self.accepted = 0  # examples taken so far (the loader notices when none are, pass after pass)

    def _pull(self, pull: Callable[[], Example]) -> Example:
        while True:
            ex = pull()
            L = example_len(ex)
            if L <= self.seq_len:
                self.min_len = min(self.min_len, L)
                self.accepted += 1
                return ex
            self.counters["too_long"] = self.counters.get("too_long", 0) + 1
            log.warning(
                "skipping sample %s: %d tokens > data.seq_len=%d (raise data.seq_len or lower image.max_crops)",
                ex.get("sample_id"),
                L,
                self.seq_len,
            )

    def next_batch(self, pull: Callable[[], Example]) -> Batch:
        """The next micro-batch; ``pull()`` returns the next Example of the stream."""
        if not self.pack:
            examples = self.pending[: self.rows]
            self.pending = self.pending[self.rows :]
            while len(examples) < self.rows:
                examples.append(self._pull(pull))
            return collate_rows([[e] for e in examples], self.pad_id)

        rows: list[list[Example]] = [[] for _ in range(self.rows)]
        free = [self.seq_len] * self.rows

        def place(ex: Example) -> bool:
            L = example_len(ex)
            fits = [r for r in range(self.rows) if free[r] >= L]
            if not fits:
                return False
            r = min(fits, key=lambda i: free[i])  # best fit: the fullest row that still takes it
            rows[r].append(ex)
            free[r] -= L
            return True

        carried, self.pending = self.pending, []
        for ex in sorted(carried, key=example_len, reverse=True):  # longest first (stable)
            if not place(ex):
                self.pending.append(ex)
        while len(self.pending) < self.max_pending and max(free) >= self.min_len:
            ex = self._pull(pull)
            if not place(ex):
                self.pending.append(ex)
        return collate_rows(rows, self.pad_id, self.seq_len)

    def pending_refs(self) -> list[Any]:
        """References of the carried-over examples (``ref`` of each), for the data position."""
        return [ex["ref"] for ex in self.pending]
