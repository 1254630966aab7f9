"""Evaluation during training: the eval harness's own task metrics on the in-training model.

``train.eval`` names held-out data per task and an interval::

    train:
      eval: {every: 250, limit: 50, tasks: {synth_charts: data/synth/charts_eval}}

Every ``every`` steps (and after the last) each rank answers its share of the records with the
model it is training (the runner splits records across ranks and rank 0 scores them), so the
scores are those ``mmsmall eval`` gives on the checkpoint of that step. Predictions and
``results.json`` go to ``out_dir/eval/step_XXXXXXXX/``; the scores are logged by the run
monitor (``eval.jsonl``, TensorBoard, wandb) and drawn beside the loss in ``loss.png``.
Evaluation runs under its own random state, so training continues exactly as without it.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmsmall.config import ConfigError

log = logging.getLogger(__name__)


class LiveEval:
    """Runs ``eval.runner.evaluate`` on the engine's model at the configured steps."""

    def __init__(self, cfg: Any, engine: Any):
        self.cfg = cfg.train.eval
        self.out = Path(cfg.out_dir) / "eval"
        self.precision = cfg.train.precision
        self.last_step = cfg.train.steps
        if not self.cfg.every:
            return
        if engine.zero_optimization_stage() == 3:
            raise ConfigError(
                "train.eval: evaluation during training needs whole parameters on each rank "
                "(ZeRO stage 0-2); under ZeRO-3 set train.eval.every=0 and run `mmsmall eval` on checkpoints"
            )
        from eval.tasks.base import get_task

        for name in self.cfg.tasks:
            get_task(name)  # an unknown name fails now, listing the valid ones, not after hours

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and (step % self.cfg.every == 0 or step == self.last_step)

    def __call__(self, step: int, engine: Any, monitor: Any) -> dict[str, float] | None:
        """Evaluate at ``step`` when due; returns ``{"eval/TASK": score}`` (on rank 0) or None."""
        if not self.due(step):
            return None
        from eval.runner import evaluate
        from mmsmall.inference.predictor import Predictor
        from mmsmall.train.checkpoint import tag_of

        model = engine.module
        was_training = model.training
        # a Predictor that casts its model (a `dtype` argument) must keep the training precision
        keep = {"dtype": self.precision} if "dtype" in inspect.signature(Predictor).parameters else {}
        with torch.random.fork_rng(devices=[]):  # the DataLoader draws a seed from the global RNG
            try:
                results = evaluate(
                    Predictor(model, device=engine.device, **keep),
                    list(self.cfg.tasks),
                    self.out / tag_of(step),
                    batch_size=self.cfg.batch_size,
                    limit=self.cfg.limit or None,
                    data={k: str(v) for k, v in self.cfg.tasks.items()},
                    num_workers=0,
                    show_progress=False,
                )
            finally:
                model.train(was_training)
        if dist.is_initialized():
            dist.barrier()
        if not results:  # ranks other than 0
            return None
        scores = {f"eval/{name}": float(r["score"]) for name, r in results["tasks"].items()}
        monitor.log_eval(step, scores)
        log.info("step %d eval: %s", step, ", ".join(f"{k[5:]} {v:.1f}" for k, v in scores.items()))
        return scores
