"""Fine tasks: many ~1 ms context tasks on many workers, dask-context against plain Dask.

    python -m benchmarks.fine_tasks                    # 10,000 tasks of 1 ms, 16 workers
    python -m benchmarks.fine_tasks --tasks 2000 --workers 4 --repeat 1

In-process workers (``LocalCluster(processes=False)``, one thread each), so that 16
of them fit on a small machine; the task sleeps its millisecond (a GIL-free wait, as
an inference call on a GPU is), so the scheduler and the router are what is
measured: the whole process is busy on one core (the GIL), so its CPU time tracks
the wall time and is reported too. The context is already warm on every worker
before the clock starts, and the plain arm runs the same function without a mark.
Each round starts a fresh cluster and runs both arms on it, plain first in even
rounds and dask-context first in odd ones, each after a full garbage collection:
an in-process cluster that has run a few computations runs the next one slower
(half again after eight, on the EPYC VM: more objects for each full collection to
walk), which on one long-lived cluster favours whichever arm runs first. Rounds
are repeated so that the spread shows the run-to-run noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from distributed import Client, LocalCluster, wait

import dask_context


def load() -> dict:
    return {"ready": True}


def step(x: int, seconds: float) -> int:
    dask_context.get_context("fine")
    time.sleep(seconds)
    return x


def plain_step(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def run(client: Client, ntasks: int, seconds: float, routed: bool, tag: str) -> tuple[float, float]:
    """One arm once: wall seconds and this process's CPU seconds (cluster and client)."""
    gc.collect()  # neither arm pays for the garbage the other left
    start, cpu = time.perf_counter(), time.process_time()
    keys = [f"{tag}-{i}" for i in range(ntasks)]
    if routed:
        with dask_context.use("fine"):
            futures = client.map(step, range(ntasks), seconds=seconds, key=keys)
    else:
        futures = client.map(plain_step, range(ntasks), seconds=seconds, key=keys)
    wait(futures)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    del futures  # released, not cancelled: a cancel logs a line per key
    return wall, cpu


def round_on_a_fresh_cluster(args: argparse.Namespace, r: int) -> tuple[dict[str, tuple[float, float]], int]:
    """Both arms on one new cluster, the first alternating with ``r``: their times
    and the workers that held the context warm."""
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        dask_context.register(client, dask_context.ContextSpec("fine", load))
        # warm every worker, and both arms' code paths, before the clock starts
        n = 4 * args.workers
        with dask_context.use("fine"):
            wait(client.map(step, range(n), seconds=0.05, key=[f"warm-{i}" for i in range(n)]))
        wait(client.map(plain_step, range(n), seconds=0.05, key=[f"warm-plain-{i}" for i in range(n)]))
        times = {arm: run(client, args.tasks, args.seconds, arm != "plain", f"{arm}{r}")
                 for arm in ("plain", "dask-context")[::1 if r % 2 == 0 else -1]}
        return times, len(dask_context.report(client)["contexts"]["fine"]["warm"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per arm")
    parser.add_argument("--workers", type=int, default=16, help="in-process workers, 1 thread each")
    parser.add_argument("--seconds", type=float, default=0.001, help="duration of a task")
    parser.add_argument("--repeat", type=int, default=6,
                        help="rounds, each on a fresh cluster running both arms, the first alternating "
                             "(an even number runs each arm first as often)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write fine_tasks.json and fine_tasks.md into this folder")
    args = parser.parse_args()
    walls: dict[str, list[float]] = {"plain": [], "dask-context": []}
    cpus: dict[str, list[float]] = {"plain": [], "dask-context": []}
    warm = []
    for r in range(args.repeat):
        times, held = round_on_a_fresh_cluster(args, r)
        warm.append(held)
        for arm, (wall, cpu) in times.items():
            walls[arm].append(wall)
            cpus[arm].append(cpu)
    out = {
        "tasks": args.tasks, "workers": args.workers, "task_seconds": args.seconds,
        "warm_workers": min(warm),
        "plain_s": [round(w, 2) for w in walls["plain"]],
        "dask_context_s": [round(w, 2) for w in walls["dask-context"]],
        "cpu_us_per_task": {arm: round(statistics.median(c) / args.tasks * 1e6, 1)
                            for arm, c in cpus.items()},
        "ratio_of_medians": round(
            statistics.median(walls["dask-context"]) / statistics.median(walls["plain"]), 3),
        "round_ratios": [
            round(c / p, 3) for p, c in zip(walls["plain"], walls["dask-context"], strict=True)],
    }
    out["median_round_ratio"] = round(statistics.median(out["round_ratios"]), 3)
    line = (f"{args.tasks} tasks of {args.seconds * 1000:g} ms on {args.workers} workers "
            f"({min(warm)} warm), {args.repeat} rounds, each on a fresh cluster: plain {out['plain_s']} s, dask-context "
            f"{out['dask_context_s']} s; dask-context / plain per round {out['round_ratios']}, "
            f"median {out['median_round_ratio']}; ratio of medians {out['ratio_of_medians']}; "
            f"CPU per task (median) plain {out['cpu_us_per_task']['plain']} us, dask-context "
            f"{out['cpu_us_per_task']['dask-context']} us")
    print(json.dumps(out) if args.json else line)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fine_tasks.json").write_text(json.dumps(out, indent=1))
        (args.out / "fine_tasks.md").write_text(
            "# Fine tasks\n\n`python -m benchmarks.fine_tasks`: in-process workers, one "
            "thread each, warm; each round starts a fresh cluster and runs both arms on it, "
            "plain first in even rounds and dask-context first in odd ones, each after a "
            "full garbage collection.\n\n" + line + "\n")


if __name__ == "__main__":
    main()
