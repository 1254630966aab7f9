"""Held-out synthetic clocks (``clock`` samples; answers ``H:MM``): exact match after stripping."""

from ..metrics import exact_match
from .base import register
from .common import shard_task

TASK = register(
    shard_task("synth_clocks", ("clock",), "exact_match", exact_match, max_new_tokens=16, molmo_style="clock",
               description="held-out synthetic clocks, exact match of H:MM")
)  # fmt: skip
