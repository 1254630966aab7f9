"""Held-out synthetic documents and tables (``doc_qa`` samples of our shards): ANLS."""

from ..metrics import anls
from .base import register
from .common import shard_task

TASK = register(
    shard_task("synth_docs", ("doc_qa",), "anls", anls, max_new_tokens=32, molmo_style="doc_qa",
               description="held-out synthetic documents/tables, ANLS")
)  # fmt: skip
