"""The training loop with its collectives and host reads counted: ``python sync_count_worker.py
OUT.json CONFIG [key=value ...]`` (tests/test_host_syncs.py).

``torch.distributed.all_reduce`` and the tensor methods that read a value back to the host
(``item``, ``tolist``, ``float()``, ``int()``, ``bool()``) are wrapped to count the calls made from
``mmsmall/train/loop.py`` itself (DeepSpeed's own gradient collectives are not the loop's). The
counts between two steps' ``RunMonitor.samples`` calls are that step's; OUT.json gets them per step.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch
import torch.distributed as dist

from mmsmall.train import loop
from mmsmall.train.monitor import RunMonitor

counts: Counter = Counter()
per_step: dict[int, dict[str, int]] = {}


def _from_loop() -> bool:
    return sys._getframe(2).f_globals.get("__name__") == loop.__name__


def _counted(kind: str, fn):
    def wrapper(*args, **kwargs):
        if _from_loop():
            counts[kind] += 1
        return fn(*args, **kwargs)

    return wrapper


dist.all_reduce = _counted("all_reduce", dist.all_reduce)
for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
    setattr(torch.Tensor, name, _counted("host_read", getattr(torch.Tensor, name)))

_samples = RunMonitor.samples


def samples(self, step: int, ids: list[str]) -> None:
    per_step[step] = dict(counts)
    counts.clear()
    _samples(self, step, ids)


RunMonitor.samples = samples

if __name__ == "__main__":
    code = loop.main(sys.argv[2:])
    with open(sys.argv[1], "w") as f:
        json.dump({"code": code, "per_step": per_step}, f)
