"""Held-out synthetic scenes: counting (count accuracy) and pointing (F1 within a distance).

``synth_scenes_count`` keeps the ``counting`` samples, ``synth_scenes_point`` the ``pointing``
ones; gold points come from the sample's ``points`` field (normalized), matched one-to-one within
``pointing.DIST_THRESHOLD`` of the image diagonal.
"""

from ..metrics import count_accuracy
from .base import register
from .common import shard_task
from .pointing import score_points

COUNT = register(
    shard_task("synth_scenes_count", ("counting",), "accuracy", count_accuracy, max_new_tokens=16,
               molmo_style="counting", description="held-out synthetic scenes, count accuracy")
)  # fmt: skip
POINT = register(
    shard_task("synth_scenes_point", ("pointing",), "f1", None, max_new_tokens=192, molmo_style="pointing",
               description="held-out synthetic scenes, pointing F1 (distance threshold)", scorer=score_points)
)  # fmt: skip
