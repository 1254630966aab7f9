"""The training loop: ``python -m mmsmall.train CONFIG [key=value ...]`` on every rank.

One optimizer step = ``grad_accum`` packed micro-batches per rank. The loss of the step is the
sum of per-token losses over the whole accumulation window and all ranks divided by the global
count of target tokens (with ``train.loss_weighting``: weighted losses by the sum of the
weights), which is all-reduced *before* the backward passes; DeepSpeed averages
gradients over ranks, so each micro-batch's backward gets ``loss_sum * world / n_global``
(``scale_wrt_gas=False``: the division is already global).

Host syncs: a step reads nothing from the device until its one all-reduce, which carries the
loss sum, the count of non-finite losses, the next step's target tokens (its micro-batches are
drawn before it) and the logged counts, read back once; the optimizer step follows, unless a
loss was non-finite. Only the first step of a run has one all-reduce more (its target count).
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
from collections.abc import Callable
from pathlib import Path

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


def _all_reduce_once(
    on_device: list[torch.Tensor], on_host: list[float], device: torch.device
) -> list[float]:
    """The step's one all-reduce and its one device-to-host read: device scalars (not read
    before) and host numbers summed over ranks in one float64 tensor."""
    host = torch.tensor(on_host, dtype=torch.float64).to(device, non_blocking=True)
    t = torch.cat([torch.stack(on_device).to(torch.float64), host])
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


def train_step(
    engine,
    micro: list[dict],
    world: int,
    dtype: torch.dtype,
    step: int,
    n_global: float | None = None,
    fuse: Callable[[], list[float]] | None = None,
) -> tuple[float, list[float]]:
    """Forward/backward every micro-batch of one optimizer step, then one all-reduce of the loss
    sum, the non-finite count and ``fuse()``'s host numbers (read once), then the optimizer step,
    unless a loss was non-finite. ``n_global``: the step's target tokens (or their weights, see
    ``loss_normalizer``) over all ranks. Returns
    (global loss per target token, ``fuse()``'s numbers summed over ranks). Without ``n_global``
    (a caller outside the loop) it is all-reduced first, one all-reduce more."""
    if n_global is None:
        (n_global,) = _all_reduce([sum(loss_normalizer(b) for b in micro)], engine.device)
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
    flags = torch.stack(finite)
    loss_all, n_bad, *fused = _all_reduce_once(
        [loss_sum, (~flags).sum()], fuse() if fuse else [], engine.device
    )
    if n_bad:
        for ok, b in zip(flags.tolist(), micro):  # the failure path: its own read
            if not ok:
                log.error(
                    "rank %d step %d: non-finite loss on samples %s", dist.get_rank(), step, b["sample_ids"]
                )
        raise NonFiniteLoss(
            f"non-finite loss at step {step}; step skipped, run stopped (sample ids logged above)"
        )
    engine.step()
    return loss_all / max(n_global, 1.0), fused


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


def main(argv: list[str] | None = None) -> int:
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    # what launch/train.sh checked already; also for torchrun / SLURM / a plain python run
    cfg, model_keys = check_run(argv[0], argv[1:], probe_lock=False)
    # DeepSpeed's ZeRO still calls deprecated torch collectives once per bucket; the warnings flood the log.
    warnings.filterwarnings("ignore", message="`torch.distributed.[a-z_]+` is deprecated")
    rank, world = init_distributed()
    setup_logging(logging.INFO if rank == 0 else logging.WARNING)
    t, out = cfg.train, Path(cfg.out_dir)
    lock = _own_out_dir(out, rank)  # rank 0 holds out_dir until the run ends
    start = _resume_point(
        cfg, out / "checkpoints", rank, world, model_keys
    )  # refuses a changed config before any build
    if rank == 0 and start.tag is None:  # a fresh run: an earlier run's logs and eval answers are not its own
        resume.set_aside_records(out)
    dist.barrier()

    from mmsmall.inference.chat_template import make_processor

    seed_everything(cfg.seed)  # the same initial weights on every rank (ZeRO-3: rank 0's, broadcast)
    # ZeRO-3: partitioned while it is built; a later stage (train.init_from): the previous model
    # with its config and tokenizer. `built` keeps transformers' ZeRO-3 view alive for the run.
    built = build_model(cfg, world, model_keys)
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
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    flops, peak = FlopCounter(model, t.freeze), peak_flops()

    step, ckpt_root = 0, out / "checkpoints"
    client = checkpoint.load_latest(engine, ckpt_root, start.tag) if start.tag else None
    if client is not None:
        step = client["step"]
        if "data_all" in client:  # saved by another number of ranks
            data.load_elastic(client["data_all"])
        else:
            data.load_state_dict(client["data"])
        if client["rng"] is None:
            seed_everything(cfg.seed * 1000 + rank)
    else:
        seed_everything(cfg.seed * 1000 + rank)  # per-rank training randomness
    monitor = RunMonitor(cfg, rank, step)
    if client is not None:  # mark the restart: the steps after it are logged again, by this run
        monitor.event({"event": "resume", "step": step, "checkpoint": start.tag, "notes": start.notes})
    live_eval = LiveEval(cfg, engine)  # train.eval: the eval harness on the in-training model

    def draw() -> tuple[list[dict], float]:  # one step's micro-batches and their loss denominator
        micro = [data.next_batch() for _ in range(t.grad_accum)]
        return micro, sum(loss_normalizer(b) for b in micro)

    counts = dict.fromkeys(COUNTS, 0)
    try:
        micro, n_local = draw() if step < t.steps else ([], 0)
        # later steps: fused into the step's one; the data counts so far (a resumed run's included)
        n_global, *counts = _all_reduce([n_local, *data.counts()], engine.device)
        counts = dict(zip(COUNTS, map(int, counts)))
        while step < t.steps:
            t0 = time.perf_counter()
            saving = step + 1 == t.steps or bool(t.save_every and (step + 1) % t.save_every == 0)
            ahead: dict = {}

            def fuse(micro=micro, ahead=ahead, saving=saving, last=step + 1 == t.steps) -> list[float]:
                # this step's repeats and the data position of its end, then the next step's
                # micro-batches (drawn now so their target count rides on this step's all-reduce)
                data.count_step([i for b in micro for i in b["sample_ids"]])
                ahead["data"] = data.state_dict() if saving else None
                ahead["micro"], n_next = draw() if not last else ([], 0)
                targets, useful = (sum(c) for c in zip(*(batch_counts(b) for b in micro)))
                n_samples = sum(len(b["sample_ids"]) for b in micro)
                step_flops = sum(flops.step_flops(b) for b in micro)
                return [n_next, targets, useful, n_samples, step_flops, *data.counts()]

            loss, (n_next, n_targets, tokens, samples, total_flops, *counts) = train_step(
                engine, micro, world, dtype, step + 1, n_global, fuse
            )
            step += 1
            counts = dict(zip(COUNTS, map(int, counts)))  # every rank's, summed
            monitor.warn_repeats(step, counts["repeated_samples"])
            ids = [i for b in micro for i in b["sample_ids"]]
            dt = time.perf_counter() - t0
            monitor.samples(step, ids)
            if step % t.log_every == 0 or step == t.steps:
                groups = engine.lr_scheduler.optimizer.param_groups
                monitor.log(
                    {
                        "step": step,
                        "loss": loss,
                        "n_targets": int(n_targets),
                        "tokens": int(tokens),
                        "samples": int(samples),
                        "tokens_per_s": tokens / dt,
                        "samples_per_s": samples / dt,
                        "mfu": None if peak is None else total_flops / dt / (peak * world),
                        "step_time_s": dt,
                        "peak_mem_gib": peak_memory_gib(engine.device),
                        **{f"lr/{g['name']}": g["lr"] for g in groups},
                        **{f"data/{k}": n for k, n in counts.items()},
                    }
                )
            kill_here = faults.kill_at_step() == step
            if saving:
                checkpoint.save(
                    engine,
                    ckpt_root,
                    step,
                    ahead["data"],
                    cfg,
                    keep_last=t.keep_last,
                    kill_during_save=kill_here and faults.kill_during_save(),
                )
            live_eval(step, engine, monitor)
            faults.hold_after(step)
            if kill_here:  # tests: a hard crash right after this step (and its checkpoint, if any)
                log.warning("debug: killing rank %d after step %d", rank, step)
                os.kill(os.getpid(), signal.SIGKILL)
            micro, n_global = ahead["micro"], n_next
    except (NonFiniteLoss, NoUsableData) as e:
        log.error("%s", e)
        return 1
    finally:
        data.close()
        monitor.summary(step, counts)
        monitor.close()
    checkpoint.save_model(engine, out / "model")
    dist.destroy_process_group()
    if lock is not None:
        lock.release()
    return 0
