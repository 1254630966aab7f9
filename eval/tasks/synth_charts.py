"""Held-out synthetic charts (``chart_qa`` samples of our shards): ChartQA relaxed accuracy."""

from ..metrics import relaxed_accuracy
from .base import register
from .common import shard_task

TASK = register(
    shard_task("synth_charts", ("chart_qa",), "relaxed_accuracy", relaxed_accuracy, max_new_tokens=16,
               molmo_style="chart_qa", description="held-out synthetic charts, relaxed accuracy")
)  # fmt: skip
