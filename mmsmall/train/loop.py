"""The training loop: ``python -m mmsmall.train CONFIG [key=value ...]`` on every rank.

One optimizer step = ``grad_accum`` packed micro-batches per rank. The loss of the step is the
sum of per-token losses over the whole accumulation window and all ranks divided by the global
count of target tokens (with ``train.loss_weighting``: weighted losses by the sum of the
weights), which is all-reduced *before* the backward passes; DeepSpeed averages
gradients over ranks, so each micro-batch's backward gets ``loss_sum * world / n_global``
(``scale_wrt_gas=False``: the division is already global).

``main`` reads as the run goes: set up, resume or start, then per step: forward/backward per
micro-batch (``forward_backward``), draw the next step's micro-batches while the device works
(``draw``: their ``STEP_COUNTS``, the loss denominator among them, counted once per micro-batch
and kept on the device), one fused all-reduce (``fused_all_reduce``), the optimizer step, log,
save. Host syncs: a step reads nothing from the device until that all-reduce, which carries the
loss sum, the count of non-finite losses, the step's counts, the next step's loss denominator
and the data counts, read back once; the optimizer step follows, unless a loss was non-finite.
Only the first step of a run has one all-reduce more (its loss denominator).
"""

from __future__ import annotations

import logging
import os
import random
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mmsmall import faults
from mmsmall.config import ConfigError, save_config
from mmsmall.data.loader import COUNTS, NoUsableData, TrainData, batch_counts
from mmsmall.export import intact
from mmsmall.logs import setup_logging
from mmsmall.processing.batch import loss_normalizer, model_inputs
from mmsmall.train import checkpoint, resume, stage
from mmsmall.train.engine import build_engine, init_distributed
from mmsmall.train.flops import FlopCounter, peak_flops
from mmsmall.train.live_eval import LiveEval
from mmsmall.train.monitor import RunMonitor
from mmsmall.train.preflight import check_run
from mmsmall.train.runlock import RunLock
from mmsmall.train.zero_init import build_model, held_elements

log = logging.getLogger("mmsmall.train")

USAGE = "usage: python -m mmsmall.train CONFIG [key=value ...]   (e.g. configs/train/tiny-pretrain.yaml train.steps=20)"


class NonFiniteLoss(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak memory so far: the CUDA allocator's peak on a GPU, the process's peak
    resident set on CPU. Read from host counters, no sync. On Linux the peak is ``VmHWM`` of
    /proc/self/status, this process's own: ``ru_maxrss`` keeps the peak of the process that
    started it (a launcher, a test runner) across fork and exec."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """What the model takes of ``batch`` (model_inputs), on ``device``, floats in ``dtype``
    (the loss weights stay fp32, as the host normalizer summed them)."""
    out = {}
    for k, v in model_inputs(batch).items():
        if isinstance(v, torch.Tensor):
            cast = dtype if v.is_floating_point() and k != "label_weights" else None
            v = v.to(device, dtype=cast, non_blocking=True)
        out[k] = v
    return out


# What a step sums over ranks about its micro-batches, counted once per micro-batch when drawn.
STEP_COUNTS = ("normalizer", "targets", "tokens", "samples", "flops")


@dataclass
class StepBatches:
    """One optimizer step's micro-batches on this rank and their ``STEP_COUNTS`` (a float64
    vector on the device, summed over ranks by a step's one all-reduce)."""

    micro: list[dict]
    counts: torch.Tensor  # (len(STEP_COUNTS),) float64
    ids: list[str]


def draw(data: TrainData, grad_accum: int, flops: FlopCounter | None, device: torch.device) -> StepBatches:
    """The next ``grad_accum`` micro-batches and their counts: the loss denominator (the target
    count, or with ``train.loss_weighting`` the targets' weights: ``loss_normalizer``), target
    and real tokens, samples and FLOPs."""
    micro = [data.next_batch() for _ in range(grad_accum)]
    rows = []
    for b in micro:
        targets, tokens = batch_counts(b)
        normalizer = float(targets) if b.get("label_weights") is None else loss_normalizer(b)
        rows.append(
            [normalizer, targets, tokens, len(b["sample_ids"]), flops.step_flops(b) if flops else 0.0]
        )
    counts = torch.tensor([sum(c) for c in zip(*rows)], dtype=torch.float64).to(device, non_blocking=True)
    return StepBatches(micro, counts, [i for b in micro for i in b["sample_ids"]])


def forward_backward(
    engine, micro: list[dict], world: int, dtype: torch.dtype, n_global: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of every micro-batch (``loss_sum * world / n_global`` each: DeepSpeed
    averages over ranks); the optimizer steps only after the last (``engine.step`` accumulates
    before). Returns the loss sum and the per-micro-batch finite flags, both left on the device."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    finite = []
    for k, b in enumerate(micro):
        out = engine(**_to_device(b, engine.device, dtype), loss_reduction="sum", keep_logits=False)
        loss = out.loss.detach()
        finite.append(torch.isfinite(loss))
        loss_sum = loss_sum + loss.to(torch.float64)
        engine.backward(out.loss * world / max(n_global, 1.0), scale_wrt_gas=False)
        if k < len(micro) - 1:
            engine.step()  # accumulates; the optimizer steps after the last micro-batch
    return loss_sum, torch.stack(finite)


@dataclass
class StepSums:
    """A step's numbers summed over ranks, from its one all-reduce and one host read."""

    loss_sum: float
    n_bad: int  # non-finite micro-batch losses
    counts: dict[str, float]  # this step's STEP_COUNTS
    n_next: float  # the next step's loss denominator (0 at the last step)
    data: dict[str, int]  # the data COUNTS of the run so far


def fused_all_reduce(
    loss_sum: torch.Tensor, finite: torch.Tensor, this: StepBatches, nxt: StepBatches | None, data: list[int]
) -> StepSums:
    """The step's one all-reduce and its one device-to-host read: the loss sum, the non-finite
    count and the step's counts (on the device, never read before), the next step's loss
    denominator (drawn before it so that its backward can scale) and the data counts."""
    device = loss_sum.device
    n_next = nxt.counts[:1] if nxt is not None else torch.zeros(1, dtype=torch.float64, device=device)
    host = torch.tensor(data, dtype=torch.float64).to(device, non_blocking=True)
    t = torch.cat([torch.stack([loss_sum, (~finite).sum().to(torch.float64)]), this.counts, n_next, host])
    dist.all_reduce(t)
    v = t.tolist()
    k = 2 + len(STEP_COUNTS)
    counts = dict(zip(STEP_COUNTS, v[2:k]))
    return StepSums(v[0], int(v[1]), counts, v[k], dict(zip(COUNTS, map(int, v[k + 1 :]))))


def check_finite(sums: StepSums, finite: torch.Tensor, micro: list[dict], step: int) -> None:
    """Stop the run at a non-finite loss on any rank, naming this rank's samples (no optimizer step)."""
    if not sums.n_bad:
        return
    for ok, b in zip(finite.tolist(), micro):  # the failure path: its own read
        if not ok:
            log.error(
                "rank %d step %d: non-finite loss on samples %s", dist.get_rank(), step, b["sample_ids"]
            )
    raise NonFiniteLoss(
        f"non-finite loss at step {step}; step skipped, run stopped (sample ids logged above)"
    )


def train_step(
    engine, micro: list[dict], world: int, dtype: torch.dtype, step: int
) -> tuple[float, StepSums]:
    """One optimizer step outside the loop (a test's own batches): the loss denominator
    all-reduced first, then what the loop does. Returns the global loss per target token."""
    (n_global,) = _all_reduce([sum(loss_normalizer(b) for b in micro)], engine.device)
    batches = StepBatches(micro, torch.zeros(len(STEP_COUNTS), dtype=torch.float64, device=engine.device), [])
    loss_sum, finite = forward_backward(engine, micro, world, dtype, n_global)
    sums = fused_all_reduce(loss_sum, finite, batches, None, [0] * len(COUNTS))
    check_finite(sums, finite, micro, step)
    engine.step()
    return sums.loss_sum / max(n_global, 1.0), sums


def _resume_point(cfg, ckpt_root: Path, rank: int, world: int, model_keys: list[str]) -> intact.ResumePoint:
    """The verified checkpoint to resume from, with the reasons for any passed over; the config
    must agree with it (``resume.check_resume_config``) or the run stops here, before DeepSpeed."""
    point = intact.find_resume(ckpt_root)
    for note in point.notes:
        if rank == 0:
            log.warning("resume: %s", note)
    if point.tag is not None:
        model = None
        if cfg.train.init_from:  # the model a later stage trains: the folder's, with its own processing
            model = stage.stage_model(stage.folder_model_config(cfg.train.init_from), cfg.model, model_keys)
        applied = resume.check_resume_config(cfg, ckpt_root / point.tag, world, model)
        note = resume.global_batch_change(cfg, ckpt_root / point.tag, world)
        if rank == 0:
            log.info(
                "resume: from %s%s", ckpt_root / point.tag, f" with {'; '.join(applied)}" if applied else ""
            )
            if note:
                log.warning("resume: %s", note)
    return point


def _own_out_dir(out: Path, rank: int) -> RunLock | None:
    """Rank 0 locks ``out`` for this run (``runlock``) before anything is written there; every
    rank learns whether another live run holds it, and the run stops with its pid and host."""
    lock, refusal = None, [None]
    if rank == 0:
        try:
            lock = RunLock(out)
        except ConfigError as e:
            refusal = [str(e)]
        else:
            if lock.previous:
                log.warning(
                    "out_dir: taking over %s from a run no longer alive: %s", lock.path, lock.previous
                )
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise ConfigError(refusal[0]) if rank == 0 else SystemExit(2)
    return lock


@dataclass
class Run:
    """Everything a run's steps use, set up before the first (``_set_up``)."""

    cfg: Any
    rank: int
    world: int
    out: Path
    lock: RunLock | None
    start: intact.ResumePoint
    engine: Any
    data: TrainData
    dtype: torch.dtype
    flops: FlopCounter
    peak: float | None
    monitor: RunMonitor | None = None
    live_eval: LiveEval | None = None

    def draw(self) -> StepBatches:
        return draw(self.data, self.cfg.train.grad_accum, self.flops, self.engine.device)


def _set_up(argv: list[str]) -> Run:
    """Checks, ranks, out_dir, the resume point (a changed config stops here, before any build),
    the model (``build_model``: the one loader; ZeRO-3 partitioned while built), data and engine."""
    # what launch/train.sh checked already; also for torchrun / SLURM / a plain python run
    cfg, model_keys = check_run(argv[0], argv[1:], probe_lock=False)
    # DeepSpeed's ZeRO still calls deprecated torch collectives once per bucket; the warnings flood the log.
    warnings.filterwarnings("ignore", message="`torch.distributed.[a-z_]+` is deprecated")
    rank, world = init_distributed()
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)
    out = Path(cfg.out_dir)
    lock = _own_out_dir(out, rank)  # rank 0 holds out_dir until the run ends
    start = _resume_point(cfg, out / "checkpoints", rank, world, model_keys)
    if rank == 0 and start.tag is None:  # a fresh run: an earlier run's logs and eval answers are not its own
        resume.set_aside_records(out)
    dist.barrier()

    from mmsmall.inference.chat_template import make_processor

    seed_everything(cfg.seed)  # the same initial weights on every rank (ZeRO-3: rank 0's, broadcast)
    built = build_model(cfg, world, model_keys)  # `built` keeps transformers' ZeRO-3 view alive
    cfg, model, tokenizer = built.run_cfg, built.model, built.tokenizer
    held, total = held_elements(model)
    cfg.model.point_format = cfg.data.point_format  # the saved model speaks what it trained on
    # ours, or (an imported release) fine-tuned in its own chat template
    processor = make_processor(
        cfg.model.prompt, tokenizer, cfg.model.image, cfg.model.style_prefix, cfg.data.seq_len,
        cfg.data.max_image_tokens, point_format=cfg.data.point_format,
    )  # fmt: skip
    data = TrainData(cfg, processor, tokenizer.pad_token_id, rank=rank, world_size=world)
    saved_world = checkpoint.saved_world_size(out / "checkpoints" / start.tag) if start.tag else None
    if saved_world not in (None, world):  # elastic resume: DeepSpeed loads a universal checkpoint
        built.ds_config.setdefault("checkpoint", {})["load_universal"] = True
    engine = build_engine(cfg, model, world, built.ds_config)
    per_rank = _all_reduce([held if r == rank else 0 for r in range(world)], engine.device)
    log.info(
        "parameter elements held after construction, per rank: %s of %d", [int(n) for n in per_rank], total
    )
    if rank == 0:
        save_config(cfg, out / "config.yaml")  # resolved, beside the run
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return Run(
        cfg,
        rank,
        world,
        out,
        lock,
        start,
        engine,
        data,
        dtype,
        FlopCounter(model, cfg.train.freeze),
        peak_flops(),
    )


def _resume_or_start(run: Run) -> int:
    """The step to continue from: the checkpoint's (weights, optimizer, data position, random
    state), or 0 with per-rank training randomness."""
    client = (
        checkpoint.load_latest(run.engine, run.out / "checkpoints", run.start.tag) if run.start.tag else None
    )
    if client is not None and "data_all" in client:  # saved by another number of ranks
        run.data.load_elastic(client["data_all"])
    elif client is not None:
        run.data.load_state_dict(client["data"])
    if client is None or client["rng"] is None:
        seed_everything(run.cfg.seed * 1000 + run.rank)  # per-rank training randomness
    step = client["step"] if client is not None else 0
    run.monitor = RunMonitor(run.cfg, run.rank, step)
    if client is not None:  # mark the restart: the steps after it are logged again, by this run
        run.monitor.event(
            {"event": "resume", "step": step, "checkpoint": run.start.tag, "notes": run.start.notes}
        )
    run.live_eval = LiveEval(run.cfg, run.engine)  # train.eval: the eval harness on the in-training model
    return step


def _log(run: Run, step: int, loss: float, sums: StepSums, dt: float) -> None:
    c = sums.counts
    groups = run.engine.lr_scheduler.optimizer.param_groups
    run.monitor.log(
        {
            "step": step,
            "loss": loss,
            "n_targets": int(c["targets"]),
            "tokens": int(c["tokens"]),
            "samples": int(c["samples"]),
            "tokens_per_s": c["tokens"] / dt,
            "samples_per_s": c["samples"] / dt,
            "mfu": None if run.peak is None else c["flops"] / dt / (run.peak * run.world),
            "step_time_s": dt,
            "peak_mem_gib": peak_memory_gib(run.engine.device),
            **{f"lr/{g['name']}": g["lr"] for g in groups},
            **{f"data/{k}": n for k, n in sums.data.items()},
        }
    )


def _save(run: Run, step: int, position: dict | None) -> None:
    """The checkpoint (with the data position of the step's end), live eval, test-only faults."""
    t = run.cfg.train
    kill_here = faults.kill_at_step() == step
    if position is not None:
        checkpoint.save(
            run.engine, run.out / "checkpoints", step, position, run.cfg,
            keep_last=t.keep_last, kill_during_save=kill_here and faults.kill_during_save(),
        )  # fmt: skip
    run.live_eval(step, run.engine, run.monitor)
    faults.hold_after(step)
    if kill_here:  # tests: a hard crash right after this step (and its checkpoint, if any)
        log.warning("debug: killing rank %d after step %d", run.rank, step)
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    run = _set_up(argv)
    step, t, engine, data = _resume_or_start(run), run.cfg.train, run.engine, run.data
    counts = dict.fromkeys(COUNTS, 0)
    try:
        batches = run.draw() if step < t.steps else None
        # the first step's loss denominator (later steps': in the step before's all-reduce)
        n_global, *so_far = _all_reduce(
            [float(batches.counts[0]) if batches else 0.0, *data.counts()], engine.device
        )
        counts = dict(zip(COUNTS, map(int, so_far)))
        while step < t.steps:
            t0, step = time.perf_counter(), step + 1
            loss_sum, finite = forward_backward(engine, batches.micro, run.world, run.dtype, n_global)
            data.count_step(batches.ids)
            saving = step == t.steps or bool(t.save_every and step % t.save_every == 0)
            position = data.state_dict() if saving else None  # the data position of the step's end
            nxt = run.draw() if step < t.steps else None  # the next step's, while the device works
            sums = fused_all_reduce(loss_sum, finite, batches, nxt, data.counts())
            check_finite(sums, finite, batches.micro, step)
            engine.step()
            counts = sums.data
            run.monitor.warn_repeats(step, counts["repeated_samples"])
            run.monitor.samples(step, batches.ids)
            if step % t.log_every == 0 or step == t.steps:
                _log(run, step, sums.loss_sum / max(n_global, 1.0), sums, time.perf_counter() - t0)
            _save(run, step, position)
            batches, n_global = nxt, sums.n_next
    except (NonFiniteLoss, NoUsableData) as e:
        log.error("%s", e)
        return 1
    finally:
        data.close()
        run.monitor.summary(step, counts)
        run.monitor.close()
    checkpoint.save_model(engine, run.out / "model")
    dist.destroy_process_group()
    if run.lock is not None:
        run.lock.release()
    return 0
