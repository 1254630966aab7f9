"""Rank-0 run logging: jsonl always, TensorBoard by default, wandb when installed and enabled,
a tqdm bar (loss, tokens/s, samples/s, MFU, ETA) and a loss-curve PNG at the end (the loss
smoothed the way TensorBoard smooths, raw values faint behind; in-training eval scores from
``eval.jsonl`` in a panel beside it).

Every rank also appends the sample ids it consumed per step to ``samples_rank{r}.jsonl``, which
is how a resumed run is checked to have repeated and skipped nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


class RunMonitor:
    def __init__(self, run_cfg: Any, rank: int, start_step: int):
        t = run_cfg.train
        self.out = Path(run_cfg.out_dir)
        self.rank = rank
        self.samples_file = open(self.out / f"samples_rank{rank:05d}.jsonl", "a")  # noqa: SIM115
        self.jsonl = self.tb = self.wandb = self.bar = None
        self.repeats_warned = False
        if rank != 0:
            return
        self.jsonl = open(self.out / "log.jsonl", "a")  # noqa: SIM115
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        if t.wandb:
            try:
                import wandb
            except ImportError:
                log.warning("train.wandb=true but wandb is not installed; logging to jsonl/TensorBoard only")
            else:
                self.wandb = wandb.init(
                    project="mmsmall", name=run_cfg.name, config=_plain(run_cfg), resume="allow"
                )
        self.bar = tqdm(total=t.steps, initial=start_step, desc=run_cfg.name, dynamic_ncols=True)

    def samples(self, step: int, ids: list[str]) -> None:
        self.samples_file.write(json.dumps({"step": step, "ids": ids}) + "\n")
        self.samples_file.flush()

    def event(self, record: dict[str, Any]) -> None:
        """A non-metric line in log.jsonl (e.g. ``{"event": "resume", "step": ...}``); rank 0 only."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        step = record["step"]
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        mfu = record.get("mfu")
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
            smp_s=f"{record['samples_per_s']:.1f}",
            mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%",
        )
        self.bar.update(step - self.bar.n)

    def log_eval(self, step: int, scores: dict[str, float]) -> None:
        """In-training eval scores (``{"eval/TASK": percent}``) to eval.jsonl, TensorBoard and wandb."""
        if self.rank != 0:
            return
        with open(self.out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **scores}) + "\n")
        if self.tb is not None:
            for k, v in scores.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scores, step=step)

    def warn_repeats(self, step: int, repeated: int) -> None:
        """Warn once (rank 0) when samples first come twice inside one step (``repeated``: so far,
        every rank's)."""
        if self.rank != 0 or not repeated or self.repeats_warned:
            return
        self.repeats_warned = True
        log.warning(
            "step %d: %d samples came twice inside one step: the training data holds fewer samples than a "
            "step takes (train.micro_batch_size x train.grad_accum, packed rows); add data or lower them "
            "(counted as data/repeated_samples)",
            step,
            repeated,
        )

    def summary(self, step: int, counts: dict[str, int]) -> None:
        """The run's data counts (every rank's, summed) at its end: one log line and a
        ``{"event": "summary"}`` line in log.jsonl; rank 0 only."""
        if self.rank != 0:
            return
        self.event({"event": "summary", "step": step, **{f"data/{k}": n for k, n in counts.items()}})
        seen = {k: n for k, n in counts.items() if n}
        log.info(
            "data at step %d: %s",
            step,
            ", ".join(f"{k} {n}" for k, n in seen.items()) or "nothing skipped, dropped or repeated",
        )

    def close(self) -> None:
        self.samples_file.close()
        if self.rank != 0:
            return
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        plot_loss(self.out / "log.jsonl", self.out / "loss.png", self.out / "eval.jsonl")


def read_log(path: str | Path) -> list[dict]:
    """The jsonl records, keeping the last record of each step (a resumed run re-logs some)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "event" not in rec:  # a resume marker, not a step
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it starts at the data."""
    out, avg = [], 0.0
    for n, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**n))
    return out


def plot_loss(log_path: Path, png: Path, eval_path: Path | None = None) -> None:
    """loss.png: raw loss faint, smoothed loss on top; in-training eval scores in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(log_path)
    if not recs:
        return
    evals = read_log(eval_path) if eval_path is not None and Path(eval_path).exists() else []
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 3.6), squeeze=False)
    ax = axes[0, 0]
    steps, loss = [r["step"] for r in recs], [r["loss"] for r in recs]
    (raw,) = ax.plot(steps, loss, lw=1, alpha=0.25)
    ax.plot(steps, smooth(loss), lw=1.6, color=raw.get_color(), label="loss (smoothed 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per target token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if evals:
        ax = axes[0, 1]
        names = sorted({k for r in evals for k in r if k.startswith("eval/")})
        for name in names:
            pts = [(r["step"], r[name]) for r in evals if name in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name[5:])
        ax.set_xlabel("step")
        ax.set_ylabel("held-out score (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _plain(cfg: Any) -> dict:
    from mmsmall.config import to_dict

    return to_dict(cfg)
