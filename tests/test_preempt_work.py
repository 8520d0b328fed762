"""A warned worker goes on working until a fresh worker is warm for its contexts.

Real process workers (a LocalCluster), warned with SIGTERM as a batch system does:
the worker keeps running context tasks while its replacement starts and loads, at
most ``work`` of its grace, then drains as before (tasks not started go back, its
results move to a peer) and leaves within the grace. Every result comes back once.
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
from distributed import Client, LocalCluster, get_worker, wait

import dask_context as dc
from dask_context import preemption
from tests.loaders import blob

LOAD = 1.0
TASK = 0.1


def work(i: int, runs: str) -> int:
    """Context task: log (start time, worker) to ``runs``; take ``TASK`` seconds."""
    dc.get_context("b")
    with open(runs, "a") as f:
        f.write(f"{time.time()} {get_worker().address}\n")
    time.sleep(TASK)
    return i


def starts(runs: Path) -> dict[str, list[float]]:
    """Task start times by worker."""
    out: dict[str, list[float]] = defaultdict(list)
    for line in runs.read_text().splitlines():
        when, worker = line.split()
        out[worker].append(float(when))
    return out


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def warn(client: Client, runs: Path, grace: float, work_share: float | None = None) -> tuple[str, float, list]:
    """Register the context, start 300 tasks, SIGTERM a warm worker once 20 are done."""
    dc.register(client, dc.ContextSpec("b", blob, args=["b"], kwargs={"seconds": LOAD}))
    if work_share is None:
        preemption.enable(client, grace=f"{grace}s")
    else:
        client.register_plugin(preemption.PreemptionPlugin(grace, ["SIGTERM"], work=work_share))
    with dc.use("b"):
        futures = client.map(work, range(300), runs=str(runs))
    wait_until(lambda: sum(f.done() for f in futures) >= 20, 60, "work under way")
    victim = dc.report(client)["contexts"]["b"]["warm"][0]
    warned = time.time()
    os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGTERM)
    return victim, warned, futures


def drained(client: Client, victim: str) -> dict:
    events = [m for _, m in client.get_events(preemption.TOPIC) if m.get("action") == "drained"]
    (summary,) = [m for m in events if m["worker"] == victim]
    return summary


@pytest.fixture
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster


def test_a_warned_worker_works_on_until_its_replacement_is_warm(cluster, tmp_path: Path) -> None:
    runs, grace = tmp_path / "runs", 40.0
    with Client(cluster) as client:
        victim, warned, futures = warn(client, runs, grace)
        # the batch system gives the freed node to a new worker, at the warning
        cluster.scale(3)
        wait_until(lambda: victim not in client.scheduler_info()["workers"], grace, "the warned worker to leave")
        left = time.time()
        wait(futures, timeout=120)
        assert sorted(f.result() for f in futures) == list(range(300))
        by_worker = starts(runs)
        summary = drained(client, victim)
    fresh = [w for w in by_worker if w != victim and min(by_worker[w]) > warned]
    assert len(fresh) == 1, by_worker.keys()
    # it worked on after the warning, until the fresh worker was warm (its first task)...
    assert sum(t > warned + 1.0 for t in by_worker[victim]) >= 5
    assert min(by_worker[fresh[0]]) < left
    # ...and left then, well before its share of the grace was over
    assert left - warned < grace * preemption.WORK
    assert summary["retired"] and 1.0 < summary["worked"] < grace * preemption.WORK


@pytest.mark.parametrize("work_share", [None, 0.0])
def test_without_a_replacement_a_warned_worker_works_its_share_of_the_grace(
        cluster, tmp_path: Path, work_share: float | None) -> None:
    runs, grace = tmp_path / "runs", 6.0
    share = preemption.WORK if work_share is None else work_share
    with Client(cluster) as client:
        victim, warned, futures = warn(client, runs, grace, work_share)
        wait_until(lambda: victim not in client.scheduler_info()["workers"], grace, "the warned worker to leave")
        left = time.time()
        wait(futures, timeout=120)
        assert sorted(f.result() for f in futures) == list(range(300))
        by_worker = starts(runs)
        summary = drained(client, victim)
    last = max(by_worker[victim])
    # it started tasks until its share of the grace was over, none after; it left in time
    assert grace * share - 0.5 < last - warned < grace * share + 0.5
    assert left - warned < grace
    assert summary["retired"] and abs(summary["worked"] - grace * share) < 0.5
