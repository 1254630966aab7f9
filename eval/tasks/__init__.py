"""Benchmarks: one file each, registered once in ``eval.tasks.base.TASKS`` on import."""

from . import ai2d, chartqa, countbench, docvqa, infovqa, ocrbench, pixmo_count, pointing, synthetic, textvqa  # noqa: F401
from .base import TASKS, EvalDataError, Record, Task, get_task, register

__all__ = ["TASKS", "EvalDataError", "Record", "Task", "get_task", "register"]
