"""Kill storm: SIGKILL a random worker process every few seconds while context tasks run.

    python -m benchmarks.kill_storm                  # 3 workers, 2000 tasks, a kill every 1.5 s for 60 s
    python -m benchmarks.kill_storm --tasks 300 --duration 8 --json

The LocalCluster's nannies restart each killed worker (a new process, cold). The run
checks what the router promises under preemption: every result comes back exactly
once and correct, no task fails with ``KilledWorker`` under Dask's default
``allowed-failures``, and loads stay bounded by the workers that ever served
(the first ones plus one per restart that got work).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster, as_completed

import dask_context as dc
from benchmarks.preempt import Preemptor
from dask_context.factcheck import make_claims
from dask_context.models import load_causal_lm, make_model


def verify_one(claim: str, seconds: float) -> dict[str, Any]:
    """Task: one claim's verdict from the worker's warm model, plus simulated work."""
    from dask_context.factcheck import verify

    verdict = verify([claim])[0]
    time.sleep(seconds)
    return verdict


def run(tasks: int = 2000, workers: int = 3, interval: float = 1.5, duration: float = 60.0,
        model_dir: str | None = None) -> dict[str, Any]:
    path = model_dir or str(make_model(Path(tempfile.gettempdir()) / "dask-context-storm", "tiny"))
    claims = make_claims(tasks, seed=3)
    # spread the work over the storm: each task takes its share of `duration`
    seconds = duration * workers / tasks
    # each nanny restarts its killed worker; a LocalCluster would also close a nanny
    # whose worker name stays off the scheduler for lost-worker-timeout (meant for
    # batch jobs), which a storm of kills makes likely
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}), LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        dc.register(client, dc.ContextSpec("verifier", load_causal_lm, args=[path]))
        start = time.perf_counter()
        with dc.use("verifier"):
            futures = client.map(verify_one, claims, seconds=seconds,
                                 key=[f"claim-{i}" for i in range(tasks)])
        done, errors = {}, {}
        with Preemptor(client, lambda: len(done) / tasks if time.perf_counter() - start < duration else 1.0,
                       interval=interval, first_fraction=0.0) as storm:
            for future in as_completed(futures):
                try:
                    done[future.key] = future.result()
                except Exception as exc:  # KilledWorker or anything else: counted, not hidden
                    errors[future.key] = repr(exc)
        wall = time.perf_counter() - start
        r = dc.report(client)["contexts"]["verifier"]
    exactly_once = sorted(done) == sorted(f"claim-{i}" for i in range(tasks)) and all(
        done[f"claim-{i}"]["claim"] == claims[i] for i in range(tasks)
    )
    return {
        "tasks": tasks, "workers": workers, "kills": len(storm.kills), "interval": interval,
        "results": len(done), "exactly_once_and_correct": exactly_once,
        "errors": len(errors), "killed_worker_errors": sum("KilledWorker" in e for e in errors.values()),
        "loads": r["loads"], "requeued": r["requeued"], "wall_seconds": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.5, help="seconds between kills")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of storm")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = run(args.tasks, args.workers, args.interval, args.duration)
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
