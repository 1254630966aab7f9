"""Run one function over work units: in this process, a local process pool, or Ray.

``run_units(fn, units, args, executor, workers)`` calls ``fn(unit, *args)`` for every unit and
returns the results in unit order, with a tqdm progress bar. ``fn`` must be a module-level
function (picklable) that commits its own outputs; results should be small dicts.

Ray: with ``RAY_ADDRESS`` set (or ``ray.init(address=...)`` called before), units run across the
cluster; every node must see the input paths and the work folder at the same absolute paths
(a shared file system), since units read inputs and commit stage files themselves.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

EXECUTORS = ("local", "ray")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


_POOL: dict[int, ProcessPoolExecutor] = {}  # the open session's local pool, by worker count


def _die_with_parent(parent: int) -> None:
    """Pool worker start-up: on Linux, ask the kernel to SIGTERM this worker when the driver dies
    (killed, SIGTERM'd, crashed), so a stopped run leaves no workers behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the driver died before the request took effect
        os._exit(1)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    """Spawned workers (never inheriting torch/thread state from the driver) that die with it."""
    return ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_die_with_parent, initargs=(os.getpid(),)
    )


@contextmanager
def session(executor: str = "local", workers: int | None = None) -> Iterator[None]:
    """Keep one worker pool (local) or one Ray connection open for every ``run_units`` call inside.

    A run that maps several phases (units, then the global pass, then shards) pays the pool's
    spawn or Ray's start once instead of once per phase.
    """
    if executor == "ray":
        started = _ray_init(workers)
        try:
            yield
        finally:
            if started:
                import ray

                ray.shutdown()
        return
    n = workers or default_workers()
    if n == 1 or n in _POOL:
        yield
        return
    _POOL[n] = _new_pool(n)
    try:
        yield
    finally:
        _POOL.pop(n).shutdown()


def run_units(
    fn: Callable[..., dict],
    units: Sequence[dict],
    args: tuple = (),
    executor: str = "local",
    workers: int | None = None,
    desc: str = "units",
) -> list[dict]:
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    if not units:
        return []
    if executor == "ray":
        return _run_ray(fn, units, args, workers, desc)
    workers = min(workers or default_workers(), len(units))
    results: list[Any] = [None] * len(units)
    bar = tqdm(total=len(units), desc=desc, unit="unit", dynamic_ncols=True)
    if workers == 1:
        for i, u in enumerate(units):
            results[i] = fn(u, *args)
            bar.update(1)
    else:
        pool = next(iter(_POOL.values()), None)  # the open session's pool, if any
        if pool is None:
            with _new_pool(workers) as own:
                _collect(own, fn, units, args, results, bar)
        else:
            _collect(pool, fn, units, args, results, bar)
    bar.close()
    return results


def _collect(
    pool: ProcessPoolExecutor, fn: Callable, units: Sequence[dict], args: tuple, results, bar
) -> None:
    futures = {pool.submit(fn, u, *args): i for i, u in enumerate(units)}
    for fut in as_completed(futures):
        results[futures[fut]] = fut.result()
        bar.update(1)


def stream_units(
    fn: Callable[..., dict],
    units: Iterable[dict],
    args: tuple = (),
    executor: str = "local",
    workers: int | None = None,
    desc: str = "units",
) -> Iterator[dict]:
    """``fn(unit, *args)`` for units drawn lazily from ``units`` (a stream too long to list, e.g. the
    download stage's shards); results are yielded as they finish, in no fixed order. Local: one unit
    after another in this process, or with ``workers`` > 1 that many at a time in a spawned process
    pool. Ray: at most ``workers`` units in flight (default: the cluster's CPUs). Either way the next
    unit is drawn only when one finishes, so the units held at once stay bounded."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    bar = tqdm(desc=desc if executor == "local" else f"{desc} (ray)", unit="unit", dynamic_ncols=True)
    if executor == "local" and (workers or 1) == 1:
        for u in units:
            yield fn(u, *args)
            bar.update(1)
        bar.close()
        return
    if executor == "local":
        from concurrent.futures import FIRST_COMPLETED, wait

        todo = iter(units)
        with _new_pool(workers) as pool:
            futs = {pool.submit(fn, u, *args) for u in itertools.islice(todo, workers)}
            while futs:
                done, futs = wait(futs, return_when=FIRST_COMPLETED)
                futs |= {pool.submit(fn, u, *args) for u in itertools.islice(todo, len(done))}
                for f in done:
                    yield f.result()
                    bar.update(1)
        bar.close()
        return
    started = _ray_init(workers)
    import ray

    try:
        remote = ray.remote(fn)
        window = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        todo = iter(units)
        refs = [remote.remote(u, *args) for u in itertools.islice(todo, window)]
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            refs.extend(remote.remote(u, *args) for u in itertools.islice(todo, len(done)))
            for r in done:
                yield ray.get(r)
                bar.update(1)
        bar.close()
    finally:
        if started:
            ray.shutdown()


def _ray_init(workers: int | None) -> bool:
    """Connect to Ray (the ``RAY_ADDRESS`` cluster, or a local one); True when this call started it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(
            "executor 'ray' needs Ray: pip install 'mmsmall[distributed]' (or 'ray[default]')"
        ) from None
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:  # join the running cluster; its resources are the cluster's, not ours to set
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as e:
                raise RuntimeError(
                    f"executor 'ray' could not join the cluster at RAY_ADDRESS={address} ({e}). Check that "
                    "`ray status` answers there; a cluster started with token authentication (Ray's "
                    "default) needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token) "
                    "in this environment too; a head on 127.0.0.1 needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
                    "on every process, or Ray rewrites the address to this machine's outward IP"
                ) from e
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        return True
    return False


def _run_ray(
    fn: Callable[..., dict], units: Sequence[dict], args: tuple, workers: int | None, desc: str
) -> list[dict]:
    started = _ray_init(workers)
    import ray

    try:
        remote = ray.remote(fn)
        # at most `workers` units in flight (all of them when not given): `--workers N` caps the
        # share of a shared cluster this run takes
        window = workers or len(units)
        results: list[Any] = [None] * len(units)
        refs: dict[Any, int] = {}
        todo = iter(range(len(units)))
        with tqdm(total=len(units), desc=f"{desc} (ray)", unit="unit", dynamic_ncols=True) as bar:
            for i in todo:
                refs[remote.remote(units[i], *args)] = i
                if len(refs) >= window:
                    break
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                for r in done:
                    results[refs.pop(r)] = ray.get(r)
                    bar.update(1)
                    nxt = next(todo, None)
                    if nxt is not None:
                        refs[remote.remote(units[nxt], *args)] = nxt
        return results
    finally:
        if started:
            ray.shutdown()
