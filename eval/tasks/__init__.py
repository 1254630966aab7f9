"""Benchmarks: one file each, registered once in ``eval.tasks.base.TASKS`` on import."""

from . import (  # noqa: F401  (each module registers its task)
    ai2d,
    chartqa,
    countbench,
    docvqa,
    infovqa,
    muirbench,
    multidocvqa,
    ocrbench,
    pixmo_count,
    pixmo_count_molmo,
    pixmo_points_eval,
    pointing,
    synth_charts,
    synth_clocks,
    synth_docs,
    synth_scenes,
    textvqa,
)
from .base import TASKS, EvalDataError, Record, Task, get_task, register

__all__ = ["TASKS", "EvalDataError", "Record", "Task", "get_task", "register"]
