"""Fine tasks: many ~1 ms context tasks on many workers, dask-context against plain Dask.

    python -m benchmarks.fine_tasks                    # 10,000 tasks of 1 ms, 16 workers
    python -m benchmarks.fine_tasks --tasks 2000 --workers 4 --repeat 1

In-process workers (``LocalCluster(processes=False)``, one thread each), so that 16
of them fit on a small machine; the task sleeps its millisecond (a GIL-free wait, as
an inference call on a GPU is), so the scheduler and the router are what is
measured. The context is already warm on every worker before the clock starts, and
the plain arm runs the same function without a mark. Arms alternate, each repeated,
so that the spread of each shows the run-to-run noise; the order flips every round
(plain first, then dask-context first), because every run leaves the in-process
cluster a little slower than the one before (distributed keeps recent tasks and
events in bounded logs, so the heap and its collections grow for a while), which
favours whichever arm runs first.
"""

from __future__ import annotations

import argparse
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


def run(client: Client, ntasks: int, seconds: float, routed: bool, tag: str) -> float:
    start = time.perf_counter()
    keys = [f"{tag}-{i}" for i in range(ntasks)]
    if routed:
        with dask_context.use("fine"):
            futures = client.map(step, range(ntasks), seconds=seconds, key=keys)
    else:
        futures = client.map(plain_step, range(ntasks), seconds=seconds, key=keys)
    wait(futures)
    wall = time.perf_counter() - start
    del futures  # released, not cancelled: a cancel logs a line per key
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per arm")
    parser.add_argument("--workers", type=int, default=16, help="in-process workers, 1 thread each")
    parser.add_argument("--seconds", type=float, default=0.001, help="duration of a task")
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds, each a run of both arms, the first arm alternating")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write fine_tasks.json and fine_tasks.md into this folder")
    args = parser.parse_args()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        dask_context.register(client, dask_context.ContextSpec("fine", load))
        # warm every worker before the clock starts
        with dask_context.use("fine"):
            wait(client.map(step, range(4 * args.workers), seconds=0.05, key=[
                f"warm-{i}" for i in range(4 * args.workers)]))
        walls: dict[str, list[float]] = {"plain": [], "dask-context": []}
        for r in range(args.repeat):
            for arm in ("plain", "dask-context")[::1 if r % 2 == 0 else -1]:
                walls[arm].append(run(client, args.tasks, args.seconds, arm != "plain", f"{arm}{r}"))
        warm = len(dask_context.report(client)["contexts"]["fine"]["warm"])
    out = {
        "tasks": args.tasks, "workers": args.workers, "task_seconds": args.seconds,
        "warm_workers": warm,
        "plain_s": [round(w, 2) for w in walls["plain"]],
        "dask_context_s": [round(w, 2) for w in walls["dask-context"]],
        "ratio_of_medians": round(
            statistics.median(walls["dask-context"]) / statistics.median(walls["plain"]), 3),
        "round_ratios": [
            round(c / p, 3) for p, c in zip(walls["plain"], walls["dask-context"], strict=True)],
    }
    out["median_round_ratio"] = round(statistics.median(out["round_ratios"]), 3)
    line = (f"{args.tasks} tasks of {args.seconds * 1000:g} ms on {args.workers} workers "
            f"({warm} warm), {args.repeat} rounds: plain {out['plain_s']} s, dask-context "
            f"{out['dask_context_s']} s; dask-context / plain per round {out['round_ratios']}, "
            f"median {out['median_round_ratio']}; ratio of medians {out['ratio_of_medians']}")
    print(json.dumps(out) if args.json else line)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fine_tasks.json").write_text(json.dumps(out, indent=1))
        (args.out / "fine_tasks.md").write_text(
            "# Fine tasks\n\n`python -m benchmarks.fine_tasks`: in-process workers, one "
            "thread each, warm; each round runs both arms, plain first in even rounds and "
            "dask-context first in odd ones.\n\n" + line + "\n")


if __name__ == "__main__":
    main()
