"""Chance level of a task, measured with the task's own metric.

``chance(task, path)`` answers every sample with one fixed answer, for each distinct gold answer
of the set, and keeps the best mean score: what a model that never looks at the image but knows
the answer distribution scores at best (the majority answer for a count or a bar name, the most
common layout for pointing). A model that reads the image must beat it; a blind model cannot.

    >>> chance("synth_charts", "demo_out/synth/charts_eval")
    {'score': 30.0, 'answer': 'East', 'n': 100, 'n_candidates': 4}
"""

from __future__ import annotations

from .tasks.base import EvalDataError, get_task


def chance(task: str, path: str, limit: int | None = None) -> dict:
    """The best score (percent) one fixed answer gets over the first ``limit`` samples of ``task``
    at ``path``, with that answer. Candidates are the samples' first gold answers, scored by the
    task's scorer and aggregated as the runner aggregates."""
    spec = get_task(task)
    records = spec.load(str(path), limit)
    if not records:
        raise EvalDataError(f"task {task}: {path} holds no samples")
    candidates = list(dict.fromkeys(r.answers[0] for r in records if r.answers))
    if not candidates:
        raise EvalDataError(f"task {task}: {path} has no gold answers to measure chance with")
    best_score, best_answer = -1.0, None
    for answer in candidates:
        per_sample = [spec.score(answer, r, False) for r in records]
        score = 100.0 * spec.aggregate(per_sample)[spec.primary]
        if score > best_score:
            best_score, best_answer = score, answer
    return {"score": best_score, "answer": best_answer, "n": len(records), "n_candidates": len(candidates)}
