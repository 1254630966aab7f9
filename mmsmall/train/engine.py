"""DeepSpeed set-up: process group, freezing, per-module AdamW groups, the filled DS config.

- ``init_distributed()`` starts the process group (gloo on CPU, NCCL on GPUs) and returns what
  it set (``Distributed``): DeepSpeed reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
  MASTER_PORT (and on CPU DS_ACCELERATOR) from the environment only, so those a plain
  single-process ``python -m mmsmall.train`` run lacks (``distributed_env``) are set there, the
  one place mmsmall writes ``os.environ``.
- ``freeze_modules`` turns ``requires_grad`` off for ``train.freeze`` and logs every module as
  frozen or trainable with its parameter count.
- ``param_groups`` builds AdamW groups per module (connector / vision / llm), each split into
  decayed (matrices) and undecayed (biases, norms: ``ndim < 2``) parameters.
- ``ds_config`` reads ``train.deepspeed`` and fills each ``"auto"`` from the run config (micro
  batch, accumulation, clipping, bf16 or fp32) or, for ZeRO-3 bucket sizes, from the LLM width
  (given, or read from a built model; ``zero_init.llm_hidden_size`` reads it before the model
  exists); an ``"auto"`` it has no source for is an error, never a guess. Gradients are reduced
  in fp32.
- ``build_optimizer`` picks the optimizer: torch AdamW from our groups, or, where the DeepSpeed
  config offloads optimizer states (``offload_optimizer``) or names an ``optimizer`` itself,
  DeepSpeed's own (CPU Adam under offload, its C++ op compiled once into ``TORCH_EXTENSIONS_DIR``)
  built by ``deepspeed.initialize`` from the config's ``optimizer`` section and the same groups.
- ``build_engine`` hands the model, the optimizer and the per-module LambdaLR to DeepSpeed.
  Under ZeRO-3 the model arrives already partitioned (``mmsmall/train/zero_init.py``), so
  parameter sizes and shapes are read from ``ds_numel`` / ``ds_shape`` where DeepSpeed set them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmsmall.config import MODULES
from mmsmall.errors import MissingInput
from mmsmall.model.params import full_numel, full_shape
from mmsmall.resources import CONFIGS_DIR, find_config, torch_extensions_dir
from mmsmall.train.schedule import build_scheduler

log = logging.getLogger(__name__)


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Distributed:
    """What ``init_distributed`` started and set; unpacks as ``rank, world = init_distributed()``."""

    rank: int
    world: int
    env: dict[str, str]  # the environment variables it set for DeepSpeed (none under a launcher)
    cpu_shm_allreduce: bool  # DeepSpeed's C++ shared-memory all-reduce (CPU runs; off unless opted in)

    def __iter__(self) -> Iterator[int]:
        return iter((self.rank, self.world))


def distributed_env() -> dict[str, str]:
    """The environment variables DeepSpeed reads that this process lacks (it reads them from the
    environment only): for a run without deepspeed / torchrun, one process (RANK=0, WORLD_SIZE=1,
    LOCAL_RANK=0, MASTER_ADDR, a free MASTER_PORT); on CPU, DS_ACCELERATOR=cpu and
    TORCH_EXTENSIONS_DIR. Reads os.environ, changes nothing."""
    env: dict[str, str] = {}
    if "RANK" not in os.environ:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if "MASTER_ADDR" not in os.environ:
            env["MASTER_ADDR"] = "127.0.0.1"
        if "MASTER_PORT" not in os.environ:
            env["MASTER_PORT"] = str(_free_port())
    if on_cpu():
        for key, value in (("DS_ACCELERATOR", "cpu"), ("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))):
            if key not in os.environ:
                env[key] = value
    return env


def init_distributed() -> Distributed:
    """Start the process group (gloo on CPU, NCCL on GPUs). The one place mmsmall writes
    ``os.environ``: the variables ``distributed_env`` finds missing, returned in ``.env``."""
    env = distributed_env()
    os.environ.update(env)
    if env:
        log.info("distributed: set %s for DeepSpeed", " ".join(f"{k}={v}" for k, v in env.items()))
    import deepspeed

    shm = not on_cpu() or os.environ.get("MMSMALL_CPU_SHM_ALLREDUCE", "0") == "1"
    if not shm:
        # DeepSpeed builds its C++ shared-memory all-reduce on the first CPU init (~30 s). It reads
        # the op's availability from deepspeed.ops.__compatible_ops__ (a dict it documents as
        # editable); marking it unavailable keeps gloo's all-reduce. MMSMALL_CPU_SHM_ALLREDUCE=1 opts in.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl")
    if not on_cpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Distributed(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), env, shm and on_cpu()
    )


# ----------------------------------------------------------------------------- parameters


def _module_of(name: str) -> str:
    head = name.split(".", 1)[0]
    return head if head in MODULES else "connector"


def freeze_modules(model: nn.Module, freeze: list[str]) -> dict[str, dict[str, Any]]:
    """Set ``requires_grad`` per module and log each as frozen / trainable; returns the summary."""
    summary: dict[str, dict[str, Any]] = {}
    for name in MODULES:
        module = getattr(model, name, None)
        if module is None:
            raise AttributeError(f"the model has no submodule {name!r}; expected vision, connector and llm")
        frozen = name in freeze
        module.requires_grad_(not frozen)
        n = sum(full_numel(p) for p in module.parameters())
        summary[name] = {"frozen": frozen, "params": n}
        log.info("%-9s %-9s %12s params", name, "frozen" if frozen else "trainable", f"{n:,}")
    others = [n for n, _ in model.named_parameters() if n.split(".", 1)[0] not in MODULES]
    if others:
        log.info("parameters outside vision/connector/llm train with the connector group: %s", others[:5])
    return summary


def set_trainable(model: nn.Module, train_cfg: Any) -> None:
    """What trains: ``train.freeze``, then with ``train.lora`` the adapters (injected here) and the
    connector, every base weight frozen. ``mmsmall plan`` counts a meta-device model set up here."""
    freeze_modules(model, train_cfg.freeze)
    if train_cfg.lora.enabled:
        from mmsmall.model.lora import apply_lora

        apply_lora(model, train_cfg.lora)


def param_groups(model: nn.Module, train_cfg: Any) -> list[dict[str, Any]]:
    """AdamW groups: one decayed and one undecayed group per trainable module."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = len(full_shape(p)) < 2  # a partitioned p is a 1-D slice
        buckets.setdefault((_module_of(name), no_decay), []).append(p)
    groups = []
    for (module, no_decay), params in sorted(buckets.items()):
        groups.append(
            {
                "params": params,
                "name": f"{module}{'_no_decay' if no_decay else ''}",
                "module": module,
                "lr": getattr(train_cfg.lr, module),
                "weight_decay": 0.0 if no_decay else train_cfg.weight_decay,
            }
        )
    if not groups:
        raise ValueError(f"train.freeze={train_cfg.freeze}: every module is frozen; nothing would train")
    return groups


# ----------------------------------------------------------------------------- DeepSpeed config


def _llm_hidden(model: nn.Module) -> int | None:
    cfg = getattr(getattr(model, "llm", None), "config", None)
    return getattr(cfg, "hidden_size", None)


def read_ds_json(train_cfg: Any) -> tuple[Path, dict[str, Any]]:
    """``train.deepspeed``: its path (as given, else among the shipped configs) and its parsed JSON."""
    path = find_config(train_cfg.deepspeed)
    if not path.exists():
        raise MissingInput(
            f"train.deepspeed: {train_cfg.deepspeed} not found (also looked among the shipped configs, {CONFIGS_DIR})"
        )
    return path, json.loads(path.read_text())


def zero_stage(run_cfg: Any) -> int:
    """``zero_optimization.stage`` of ``train.deepspeed`` (0 when the json has none)."""
    _, cfg = read_ds_json(run_cfg.train)
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def ds_config(
    run_cfg: Any, world_size: int, model: nn.Module | None = None, hidden_size: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config of ``train.deepspeed`` with every ``"auto"`` filled from the run config.

    ZeRO-3 bucket sizes come from the LLM width: ``hidden_size``, else the built ``model``'s LLM.
    """
    t = run_cfg.train
    path, cfg = read_ds_json(t)
    h = hidden_size if hidden_size is not None else _llm_hidden(model) if model is not None else None
    fill: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.clip_grad,
        "bf16.enabled": t.precision == "bf16",
        "fp16.enabled": False,
        "communication_data_type": "fp32",
    }
    if h is not None:  # ZeRO-3 buckets scale with the width (the usual h*h rule)
        fill.update(
            {
                "zero_optimization.reduce_bucket_size": h * h,
                "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * h * h),
                "zero_optimization.stage3_param_persistence_threshold": 10 * h,
            }
        )

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif v == "auto":
                if key not in fill:
                    raise ValueError(
                        f"{path}: {key} is 'auto' but mmsmall has no source for it; give a value in the json "
                        f"(auto is filled for: {', '.join(sorted(fill))})"
                    )
                node[k] = fill[key]

    walk(cfg, "")
    # Settings the run config owns are enforced even where the json gave numbers.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if cfg.get(key, fill[key]) != fill[key]:
            raise ValueError(
                f"{path}: {key}={cfg[key]} disagrees with the run config ({fill[key]}); use 'auto'"
            )
        cfg[key] = fill[key]
    _fill_optimizer_section(cfg, t, path)
    cfg.setdefault("bf16", {})["enabled"] = fill["bf16.enabled"]
    cfg.setdefault("communication_data_type", "fp32")
    cfg["zero_allow_untested_optimizer"] = True  # torch AdamW, where it is the client optimizer
    cfg.setdefault("steps_per_print", 10**9)  # the loop logs; DeepSpeed stays quiet
    return cfg


def offloads_optimizer(config: dict[str, Any]) -> bool:
    """Whether the DeepSpeed config keeps optimizer states off the accelerator (ZeRO-Offload)."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def _fill_optimizer_section(cfg: dict[str, Any], t: Any, path: Path) -> None:
    """Offload needs DeepSpeed's CPU Adam: give the config an AdamW ``optimizer`` section (when it
    has none) and fill its ``"auto"`` params from the run config. Per-group lr and weight decay
    come from ``param_groups`` and override these defaults."""
    if offloads_optimizer(cfg):
        cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if "optimizer" not in cfg:
        return
    params = cfg["optimizer"].setdefault("params", {})
    own = {"lr": t.lr.llm, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}
    for key, value in own.items():
        if params.get(key, "auto") == "auto":
            params[key] = value
    if str(cfg["optimizer"].get("type", "")).lower() not in ("adam", "adamw"):
        raise ValueError(
            f"{path}: optimizer.type={cfg['optimizer'].get('type')!r}; mmsmall trains with AdamW "
            "(give type AdamW, or drop the optimizer section)"
        )


def build_optimizer(groups: list[dict[str, Any]], train_cfg: Any, config: dict[str, Any]):
    """torch AdamW over ``groups``, or None when the DeepSpeed config has an ``optimizer`` section
    (``ds_config`` adds one under offload): then ``deepspeed.initialize`` builds it (CPU Adam
    under offload) from ``model_parameters=groups``, so per-module lr and weight decay are kept."""
    if "optimizer" in config:
        return None
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(train_cfg.betas), eps=train_cfg.eps)


def build_engine(run_cfg: Any, model: nn.Module, world_size: int, config: dict[str, Any] | None = None):
    """Freeze, group, schedule and wrap the model; returns the DeepSpeed engine.

    ``config``: the filled DeepSpeed config the model was built with (``zero_init.build_model``);
    by default ``ds_config`` of the run and this model.
    """
    import deepspeed

    t = run_cfg.train
    set_trainable(model, t)
    if t.activation_checkpointing:
        model.set_activation_checkpointing(True)
    groups = param_groups(model, t)
    config = ds_config(run_cfg, world_size, model) if config is None else config
    optimizer = build_optimizer(groups, t, config)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=lambda opt: build_scheduler(opt, t),  # on the optimizer DeepSpeed ends up with
        config=config,
    )
    source = "the DeepSpeed config" if optimizer is None else "mmsmall"
    log.info("optimizer %s (from %s)", type(engine.basic_optimizer).__name__, source)
    return engine
