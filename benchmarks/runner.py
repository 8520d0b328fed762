"""Run one Dask arm of one run on a LocalCluster, and measure it.

One cluster serves all the arms of a scenario (its workers keep their imports; the
arms clean up after themselves and use their own task keys and context names). A
scenario with a memory budget gets its own cluster because dask-context reads the
budget when a worker starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dask
from distributed import Client, Future, LocalCluster, as_completed

from benchmarks.arms import ArmSetup, DaskArm, Model, pipeline
from benchmarks.loading import read_load_log
from benchmarks.preempt import Preemptor, WarningPreemptor
from benchmarks.tasks import NodePerProcess, TaskStarts, Warmup, read_task_starts, wait_warm
from benchmarks.timeline import breakdown

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def bench_cluster(
    workers: int, threads: int = 1, budget: int | None = None, allowed_failures: int | None = None,
    staging: str | None = None,
) -> Iterator[Client]:
    """A LocalCluster of ``workers`` single-threaded worker processes, warmed up.

    Parameters
    ----------
    workers
        Worker processes (each with one thread, torch using ``threads`` threads).
    budget
        dask-context's per-worker memory budget in bytes (None: its default).
    allowed_failures
        Times a task may be on a worker that dies before Dask gives up on it
        (preemption kills workers on purpose: raise it).
    staging
        Make every worker process a node of its own, with its staging directory
        under this one (:class:`benchmarks.tasks.NodePerProcess`); None: the
        workers are one node, dask-context's default.
    """
    settings: dict[str, Any] = {}
    if budget is not None:
        settings["dask-context.worker.memory-budget"] = budget
    if allowed_failures is not None:
        settings["distributed.scheduler.allowed-failures"] = allowed_failures
    # the nannies copy the config when they start, restarts included
    with dask.config.set(settings):
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True,
            dashboard_address=None, silence_logs=logging.ERROR,
        )
    with cluster, Client(cluster) as client:
        client.register_plugin(Warmup(threads))
        if staging is not None:
            client.register_plugin(NodePerProcess(staging))
        client.get_task_stream()  # installs the task-stream recorder on the scheduler
        wait_ready(client, workers)
        yield client


def wait_ready(client: Client, workers: int, timeout: float = 300.0) -> None:
    """Block until ``workers`` workers run and finished their warm-up."""
    client.wait_for_workers(workers, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        ready = client.run(wait_warm, on_error="ignore")
        if len(ready) >= workers and all(ready.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready after {timeout} s: {ready}")
        time.sleep(0.2)


def batches_of(claims: Sequence[str], batch: int) -> list[list[str]]:
    """Consecutive batches of ``batch`` claims."""
    return [list(claims[i : i + batch]) for i in range(0, len(claims), batch)]


def check(results: Sequence[Sequence[dict[str, Any]]], batches: Sequence[list[str]]) -> None:
    """Raise unless every batch came back once, whole and in order."""
    if len(results) != len(batches):
        raise AssertionError(f"{len(results)} results for {len(batches)} batches")
    for j, (rows, batch) in enumerate(zip(results, batches, strict=True)):
        if [r["claim"] for r in rows] != batch:
            raise AssertionError(f"batch {j} came back wrong")


def run_arm(
    client: Client,
    arm: DaskArm,
    models: Sequence[Model],
    batches: Sequence[list[str]],
    setup: ArmSetup,
    *,
    workers: int,
    preempt_every: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``arm`` on the pipeline of ``models`` over ``batches``; return measurements.

    The arm's workers are preempted every ``preempt_every`` seconds (None: never),
    with a warning when the arm has a ``grace`` (:class:`WarningPreemptor`), else
    with SIGKILL (:class:`Preemptor`).

    Returns
    -------
    ``wall`` (seconds from submission to the last result), ``scheduler_cpu``
    (CPU seconds of this process, which runs the scheduler and the client), ``loads`` and
    ``load_seconds`` (from the load log), ``kills`` and ``warnings`` (the
    preemptor's records), ``reruns`` (task starts beyond each task's first, from
    ``setup.starts``; None without it), ``workers_start`` and ``workers_end``
    (addresses), ``stream`` (task-stream records), ``timeline`` (see
    :func:`timeline`), ``verdicts`` (counts) and whatever the arm's teardown reports
    (``extra``).
    """
    log = setup.load.get("log")
    for path in (log, setup.starts):
        if path:
            Path(path).unlink(missing_ok=True)
    if setup.starts:
        client.register_plugin(TaskStarts(setup.starts))
    arm.setup(client, models, setup)
    graph = pipeline(arm, batches, models, setup)
    initial = sorted(client.scheduler_info(n_workers=-1)["workers"])
    # load records name the worker process; the breakdown needs its address
    pids = worker_pids(client)
    t0 = time.time()
    # the scheduler runs in this process (LocalCluster): its CPU time, with the
    # client's, is what scheduling takes from the workers on a small machine
    cpu0 = time.process_time()
    futures = client.compute(graph)
    progress = _Progress(len(futures))
    preemptor: Preemptor | None = None
    if preempt_every and arm.grace is not None:
        preemptor = WarningPreemptor(client, progress, preempt_every, arm.grace, seed=seed)
    elif preempt_every:
        preemptor = Preemptor(client, progress, preempt_every, seed=seed)
    results, t1 = collect(futures, progress, preemptor)
    cpu = time.process_time() - cpu0
    final = sorted(client.scheduler_info(n_workers=-1)["workers"])
    pids.update(worker_pids(client))
    check(results, batches)
    stream = client.get_task_stream(start=t0)
    extra = arm.teardown(client, models, setup)
    loads = read_load_log(log) if log else {}
    reruns = read_task_starts(setup.starts)["reruns"] if setup.starts else None
    verdicts: dict[str, int] = {}
    for rows in results:
        for r in rows:
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
    kills = preemptor.kills if preemptor else []
    warnings = preemptor.warnings if preemptor else []
    logger.info(
        "%s %s: %.1f s, %s loads, %d warnings, %d kills, %s reruns",
        setup.tag, arm.name, t1 - t0, loads.get("loads"), len(warnings), len(kills), reruns,
    )
    if preempt_every:
        wait_ready(client, workers)  # replacements must be up before the next arm
    return {
        "wall": t1 - t0,
        "scheduler_cpu": cpu,
        "start": t0,
        "stop": t1,
        "loads": loads.get("loads"),
        "loads_completed": loads.get("completed"),
        "load_seconds": loads.get("seconds"),
        "load_seconds_total": loads.get("total_seconds"),
        "load_spans": [(pids[pid], a, b) for pid, a, b in loads.get("spans", ()) if pid in pids],
        "loads_per_model": loads.get("per_model"),
        "kills": kills,
        "warnings": warnings,
        "reruns": reruns,
        "workers_start": initial,
        "workers_end": final,
        "stream": stream,
        "timeline": timeline(stream, t0),
        "verdicts": verdicts,
        "extra": extra,
    }


def timeline(stream: Sequence[dict[str, Any]], t0: float) -> list[tuple[str, str, float, float]]:
    """Compact task timeline: (key, worker, compute start, compute stop), seconds after ``t0``."""
    out = [
        (str(rec["key"]), rec["worker"], round(ss["start"] - t0, 4), round(ss["stop"] - t0, 4))
        for rec in stream
        for ss in rec.get("startstops", ())
        if ss.get("action") == "compute"
    ]
    return sorted(out, key=lambda x: x[2])


class _Progress:
    """Results received so far, out of ``total``."""

    def __init__(self, total: int):
        self.total = max(1, total)
        self.done = 0

    def __call__(self) -> float:
        return self.done / self.total


def collect(
    futures: list[Future], progress: _Progress, preemptor: Preemptor | None
) -> tuple[list[Any], float]:
    """Fetch results as they finish, releasing each from the cluster, under preemption if asked.

    Results fetched this way survive the loss of the worker that computed them, as
    results sent back to a workflow manager do; results left on workers until the
    end would be recomputed after every kill (in load-per-task, with a load each).

    Returns
    -------
    The results in the order of ``futures``, and the wall-clock time the last one
    came (before the preemptor has finished with the workers it took away).
    """
    index = {f.key: j for j, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    pending = as_completed(futures, with_results=True)
    futures.clear()  # from here on, only ``pending`` holds them
    with preemptor or contextlib.nullcontext():
        for future, result in pending:
            results[index[future.key]] = result
            progress.done += 1
            future.release()
            if preemptor is not None:
                preemptor.first_kill()
        stop = time.time()
    return results, stop


def worker_pids(client: Client) -> dict[int, str]:
    """Process id -> address of each worker up now."""
    pids = client.run(os.getpid, on_error="return")
    return {pid: address for address, pid in pids.items() if isinstance(pid, int)}


def profile_arm(measured: dict[str, Any], *, workers: int, min_loads: int, load_seconds: float, inference_seconds: float) -> dict[str, float]:
    """The time breakdown of a measured arm (see :mod:`benchmarks.timeline`)."""
    return breakdown(
        measured["stream"],
        start=measured["start"],
        stop=measured["stop"],
        workers=workers,
        initial=measured["workers_start"],
        final=measured["workers_end"],
        load_seconds=measured["load_seconds_total"] or 0.0,
        min_load_seconds=min_loads * load_seconds,
        inference_seconds=inference_seconds,
        loads=measured.get("load_spans", ()),
    )
