"""Rank-0 run logging: jsonl always, TensorBoard by default, wandb when installed and enabled,
a tqdm bar (loss, tokens/s, samples/s, MFU, ETA) and a loss-curve PNG at the end.

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
        plot_loss(self.out / "log.jsonl", self.out / "loss.png")


def read_log(path: str | Path) -> list[dict]:
    """The jsonl records, keeping the last record of each step (a resumed run re-logs some)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "event" not in rec:  # a resume marker, not a step
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(log_path)
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per target token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _plain(cfg: Any) -> dict:
    from mmsmall.config import to_dict

    return to_dict(cfg)
