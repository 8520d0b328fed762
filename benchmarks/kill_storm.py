"""Kill storm: SIGKILL a random worker process every few seconds while context tasks run.

    python -m benchmarks.kill_storm                  # 3 workers, 2000 tasks, a kill every 1.5 s for 60 s
    python -m benchmarks.kill_storm --tasks 300 --duration 8 --json
    python -m benchmarks.kill_storm --arm plain      # the control: same storm, no dask-context

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
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster, SchedulerPlugin, as_completed

import dask_context as dc
from benchmarks.preempt import Preemptor
from dask_context.factcheck import judge, make_claims
from dask_context.models import load_causal_lm, make_model

ARMS = ("dask-context", "plain")
# seconds the cluster gets, after the results, to have all its workers back
SETTLE = 30.0


def verify_one(claim: str, seconds: float) -> dict[str, Any]:
    """Task: one claim's verdict from the worker's warm model, plus simulated work."""
    from dask_context.factcheck import verify

    verdict = verify([claim])[0]
    time.sleep(seconds)
    return verdict


_MODEL: dict[str, Any] = {}
_MODEL_LOCK = threading.Lock()


def plain_one(claim: str, seconds: float, path: str) -> dict[str, Any]:
    """Task of the control arm: the global-cache idiom, no dask-context."""
    with _MODEL_LOCK:
        model = _MODEL.get(path)
        if model is None:
            model = _MODEL[path] = load_causal_lm(path)
    verdict = judge(model, [claim])[0]
    time.sleep(seconds)
    return verdict


class _Count(logging.Handler):
    """Counts the records of a logger whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str):
        super().__init__(logging.DEBUG)
        self.counts = dict.fromkeys(prefixes, 0)
        self.times: dict[str, list[float]] = {p: [] for p in prefixes}  # time.time() of each

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        for prefix in self.counts:
            if msg.startswith(prefix):
                self.counts[prefix] += 1
                self.times[prefix].append(record.created)


class _Presence(SchedulerPlugin):
    """When each worker name joined and left the scheduler (it runs in this process)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, Any]] = []  # (time.time(), "add" | "remove", name)
        self._names: dict[str, Any] = {}  # the scheduler forgets a worker before telling plugins

    async def install(self, scheduler: Any) -> None:
        """Add this plugin to ``scheduler``, knowing the names of the workers there now."""
        self._names.update({a: ws.name for a, ws in scheduler.workers.items()})
        scheduler.add_plugin(self, name="kill-storm-presence")

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self._names[worker] = scheduler.workers[worker].name
        self.events.append((time.time(), "add", self._names[worker]))

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.events.append((time.time(), "remove", self._names.get(worker, worker)))

    def phases(self, restarts: list[float]) -> dict[str, Any]:
        """Median seconds from a removal to the next "Restarting worker" of a nanny
        (the nanny notices, unregisters), and from there to the next join (a new
        process starts and registers)."""
        removals = sorted(t for t, o, _ in self.events if o == "remove")
        adds = sorted(t for t, o, _ in self.events if o == "add")
        noticed = [r - t for t in removals if (r := next((r for r in sorted(restarts) if r >= t), None))]
        started = [a - r for r in restarts if (a := next((a for a in adds if a >= r), None))]

        def median(xs: list[float]) -> float | None:
            return round(sorted(xs)[len(xs) // 2], 2) if xs else None

        return {"removal_to_restart_s": median(noticed), "restart_to_join_s": median(started)}

    def downtimes(self, lost_after: float = 15.0) -> dict[str, Any]:
        """Per removal, seconds until a worker of the same name joined again; and how
        many names were off the scheduler ``lost_after`` seconds after a removal: with
        that lost-worker-timeout (Dask's default: 15 s), a LocalCluster closes the nanny
        then, and the cluster is a worker short for good."""
        events = sorted(self.events, key=lambda e: e[0])
        gaps, off_at_timeout = [], 0
        for i, (t, op, name) in enumerate(events):
            if op != "remove":
                continue
            back = next((u for u, o, n in events[i + 1:] if o == "add" and n == name), None)
            gaps.append(None if back is None else back - t)
            # the name's presence at t + lost_after: the last event of that name before then
            last = [o for u, o, n in events if n == name and u <= t + lost_after]
            if last and last[-1] == "remove":
                off_at_timeout += 1
        known = [g for g in gaps if g is not None]
        return {
            "removals": len(gaps), "never_back": gaps.count(None),
            "mean_s": round(sum(known) / len(known), 2) if known else None,
            "max_s": round(max(known), 2) if known else None,
            f"off_{lost_after:g}s_after_removal": off_at_timeout,
        }


def _nannies(cluster: LocalCluster) -> list[dict[str, Any]]:
    """State of each nanny of the cluster and of its worker process (in this process)."""
    out = []
    for name, nanny in list(cluster.workers.items()):
        process = getattr(nanny, "process", None)
        out.append({
            "name": name, "nanny": getattr(getattr(nanny, "status", None), "name", None),
            "process": getattr(getattr(process, "status", None), "name", None),
            "pid": getattr(process, "pid", None) if process is not None else None,
            "worker": getattr(process, "worker_address", None) if process is not None else None,
        })
    return out


def _dump(pid: int) -> str:
    """py-spy's stacks of a stuck process (if py-spy is installed)."""
    try:
        return subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=30).stdout
    except Exception as exc:  # diagnostics only
        return repr(exc)


def run(tasks: int = 2000, workers: int = 3, interval: float = 1.5, duration: float = 60.0,
        model_dir: str | None = None, arm: str = "dask-context", timeout: float = 300.0,
        settle: float = SETTLE, dump_stuck: bool = False, lost_worker_timeout: str = "1h",
        ) -> dict[str, Any]:
    """One storm; returns what came back and the state of the cluster afterwards.

    ``timeout``: seconds from the submission after which the client gives up on the
    results still missing (counted in ``pending`` and ``lost``). ``settle``: seconds
    the cluster then gets to have all ``workers`` connected again
    (``workers_at_end``). ``dump_stuck``: print py-spy stacks of worker processes
    that are alive but not connected at the end. ``lost_worker_timeout``: Dask's
    ``distributed.deploy.lost-worker-timeout`` for the cluster (Dask's default is 15s).
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, not {arm!r}")
    path = model_dir or str(make_model(Path(tempfile.gettempdir()) / "dask-context-storm", "tiny"))
    claims = make_claims(tasks, seed=3)
    # spread the work over the storm: each task takes its share of `duration`
    seconds = duration * workers / tasks
    restarts = _Count("Restarting worker", "Failed to restart", "Timed out connecting")
    nanny_logger = logging.getLogger("distributed.nanny")
    nanny_logger.addHandler(restarts)
    # each nanny restarts its killed worker; a LocalCluster would also close a nanny
    # whose worker name stays off the scheduler for lost-worker-timeout (meant for
    # batch jobs), which a storm of kills makes likely
    try:
        with dask.config.set({"distributed.deploy.lost-worker-timeout": lost_worker_timeout}), LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster, Client(cluster) as client:
            presence = _Presence()
            cluster.sync(presence.install, cluster.scheduler)
            keys = [f"claim-{i}" for i in range(tasks)]
            if arm == "dask-context":
                dc.register(client, dc.ContextSpec("verifier", load_causal_lm, args=[path]))
            start = time.perf_counter()
            if arm == "dask-context":
                with dc.use("verifier"):
                    futures = client.map(verify_one, claims, seconds=seconds, key=keys)
            else:
                # by reference (this module may run as __main__): its cache and lock stay on the workers
                from benchmarks.kill_storm import plain_one as task

                futures = client.map(task, claims, seconds=seconds, path=path, key=keys)
            done, errors = {}, {}
            with Preemptor(client, lambda: len(done) / tasks if time.perf_counter() - start < duration else 1.0,
                           interval=interval, first_fraction=0.0) as storm:
                try:
                    for future in as_completed(futures, timeout=timeout):
                        try:
                            done[future.key] = future.result()
                        except Exception as exc:  # KilledWorker or anything else: counted, not hidden
                            errors[future.key] = repr(exc)
                except TimeoutError:
                    logging.getLogger(__name__).warning(
                        "Gave up after %.0f s: %d of %d results", timeout, len(done), tasks)
                gave_up = len(done) + len(errors) < tasks
            wall = time.perf_counter() - start
            statuses = [f.status for f in futures if f.key not in done and f.key not in errors]
            connected_after_results = len(client.scheduler_info()["workers"])
            deadline = time.monotonic() + settle
            while len(client.scheduler_info()["workers"]) < workers and time.monotonic() < deadline:
                time.sleep(0.2)
            connected = len(client.scheduler_info()["workers"])
            nannies = _nannies(cluster)
            downtime = presence.downtimes()  # before the cluster closes
            downtime.update(presence.phases(restarts.times["Restarting worker"]))
            if dump_stuck and connected < workers:
                for n in nannies:
                    if n["pid"]:
                        print(f"--- py-spy dump of {n['name']} (pid {n['pid']}, nanny {n['nanny']}, "
                              f"process {n['process']})\n{_dump(n['pid'])}", flush=True)
            r = dc.report(client)["contexts"]["verifier"] if arm == "dask-context" else {}
    finally:
        nanny_logger.removeHandler(restarts)
    exactly_once = sorted(done) == sorted(keys) and all(
        done[f"claim-{i}"]["claim"] == claims[i] for i in range(tasks)
    )
    return {
        "arm": arm, "tasks": tasks, "workers": workers, "kills": len(storm.kills), "interval": interval,
        "results": len(done), "exactly_once_and_correct": exactly_once,
        "errors": len(errors), "killed_worker_errors": sum("KilledWorker" in e for e in errors.values()),
        "gave_up": gave_up, "pending": statuses.count("pending"), "lost": statuses.count("lost"),
        "workers_after_results": connected_after_results, "workers_at_end": connected,
        "nanny_restarts": restarts.counts["Restarting worker"],
        "failed_restarts": restarts.counts["Failed to restart"] + restarts.counts["Timed out connecting"],
        "nannies": nannies, "lost_worker_timeout": lost_worker_timeout,
        "downtime": downtime,
        "loads": r.get("loads"), "requeued": r.get("requeued"), "wall_seconds": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.5, help="seconds between kills")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of storm")
    parser.add_argument("--arm", choices=ARMS, default="dask-context",
                        help="plain: the control, a global-cache model without dask-context")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds after which the client gives up on missing results")
    parser.add_argument("--settle", type=float, default=SETTLE,
                        help="seconds the cluster gets afterwards to have all its workers back")
    parser.add_argument("--dump-stuck", action="store_true",
                        help="py-spy dumps of worker processes alive but not connected at the end")
    parser.add_argument("--lost-worker-timeout", default="1h",
                        help="Dask's distributed.deploy.lost-worker-timeout (its default: 15s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = run(args.tasks, args.workers, args.interval, args.duration, arm=args.arm,
              timeout=args.timeout, settle=args.settle, dump_stuck=args.dump_stuck,
              lost_worker_timeout=args.lost_worker_timeout)
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
