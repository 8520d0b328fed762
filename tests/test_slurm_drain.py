"""Workers warned before they are killed drain first (:mod:`dask_context.preemption`).

The tests marked ``slurm`` run against the real one-node SLURM of
``.ci/start-slurm.sh``, with the fixtures of ``tests/test_slurm.py``: 80 verification
tasks on two warm worker jobs, then one job is

- preempted by a ``high`` job while it runs in the ``grace`` partition
  (``GraceTime``: its job step gets SIGTERM at once, SIGKILL at the end of the grace);
- cancelled with ``scancel`` (SIGTERM, then SIGKILL ``KillWait`` = 5 s later);
- killed with SIGKILL (nanny and worker process), without a warning.

A warned worker must give back the tasks it had not started, finish or give up its
running task, move its results to the other worker and leave before the kill: at
most its threads plus the router's prefetch rerun, and no result it held is
recomputed. Without a warning, nothing is lost either (what it held is recomputed).

The unmarked tests drain process workers of a ``LocalCluster`` (SIGTERM, a client's
request, a task's request): the same mechanism without a batch system.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from distributed import Client, LocalCluster, get_worker, wait

import dask_context as dc
from dask_context import config, preemption
from tests.loaders import blob
from tests.test_slurm import (
    BATCHES,
    LOSS_TASK_SECONDS,
    Runs,
    Slurm,
    check_results,
    connected,
    context_events,
    expected,
    job_of,
    preempt_one_worker,
    start_slurm,
    wait_done,
    wait_until,
    warm_workers,
    worker_events,
)

logger = logging.getLogger(__name__)

# the fixtures of tests/test_slurm.py that the tests here ask for by name
SLURM_FIXTURES = (expected, start_slurm)

# the local SLURM's KillWait (.ci/start-slurm.sh): SIGTERM to SIGKILL
KILL_WAIT = 5
# below KillWait: a cancelled worker must be gone by then
GRACE = 4.0
# each worker job runs one thread (SLURMCluster(cores=1)); the router hands it that
# many context tasks plus the prefetch
THREADS = 1
PREFETCH = int(config.get("scheduler.prefetch"))


def drain_events(client: Client) -> dict[str, dict[str, dict[str, Any]]]:
    """Per worker, its ``draining`` and ``drained`` events (``at``: when the scheduler got them)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for t, event in client.get_events(preemption.TOPIC):
        out.setdefault(event["worker"], {})[event["action"]] = {**event, "at": t}
    return out


def two_warm_workers_at_work(s: Slurm, seconds: float = LOSS_TASK_SECONDS) -> list:
    """Submit the 80 tasks; return their futures once both jobs are warm and each
    holds results."""
    futures = s.submit(BATCHES, seconds=seconds)

    def both_hold_results() -> bool:
        done = [f for f in futures if f.done()]
        holders = {w for ws in s.client.who_has(done).values() for w in ws} if done else set()
        return len(warm_workers(s.client)) == 2 and len(holders) == 2 and len(done) >= 8

    wait_until(both_hold_results, 120, "two warm workers, each holding results")
    return futures


def check_drained(
    s: Slurm, futures: list, expected_verdicts: list, victim: str, job: str, how: str
) -> dict[str, Any]:
    """Everything came back once and correct, and the victim drained as it should.

    Returns the victim's ``drained`` event.
    """
    keys = {f.key for f in futures}
    results = wait_done(futures)
    check_results(results, expected_verdicts)
    runs = Runs.read(s.runs)
    assert set(runs.ends) == keys

    events = drain_events(s.client).get(victim, {})
    assert set(events) == {"draining", "drained"}, f"the worker did not drain: {events}"
    draining, drained = events["draining"], events["drained"]
    assert draining["reason"] == "SIGTERM"
    assert drained["retired"], "its results were not moved to a peer"

    # reruns: only the tasks it was running and gave up, at most threads + prefetch
    rerun = {k for k, n in runs.starts.items() if n > 1}
    abandoned = {str(k) for k in drained["abandoned"]}
    assert rerun <= abandoned, (
        f"reran {rerun - abandoned}, which the drained worker (job {job}) had not given up; "
        f"started in jobs {({k: [j for j, ks in runs.started_on.items() if k in ks] for k in rerun - abandoned})}"
    )
    assert len(rerun) <= THREADS + PREFETCH
    # the results it finished were moved to the other worker, not recomputed
    moved = runs.ended_on.get(job, set()) - abandoned
    assert moved, "the worker finished no task before it drained"
    assert all(runs.starts[k] == 1 for k in moved), "a result the drained worker held was recomputed"
    # the tasks it had not started went back to the queue and ran elsewhere, once
    given_back = {str(k) for k in drained["given_back"]}
    assert not given_back & runs.started_on.get(job, set())
    assert dc.report(s.client)["contexts"]["verifier"]["requeued"] >= len(given_back)

    # it left before the kill, and adapt replaced it with a warm worker
    added, removed = worker_events(s.client)
    signalled = draining["signalled"]
    assert victim in removed and removed[victim] - signalled < GRACE
    log_replacement(s, how, signalled, removed[victim], added, results, runs, len(keys), drained)
    return drained


def log_replacement(
    s: Slurm, how: str, since: float, left: float, added: dict[str, float],
    results: list[dict[str, Any]], runs: Runs, tasks: int, drained: dict[str, Any] | None,
) -> None:
    """Check that a replacement job became a warm worker; log the measured times."""
    jobs = s.jobs.snapshot()
    new = [j for j, t in jobs.items() if t.seen > since]
    assert new, "adapt did not submit a replacement job"
    replacement = min(new, key=lambda j: jobs[j].seen)
    late = [w for w, t in added.items() if t > since]
    assert late, "no worker joined after the loss"
    new_worker = min(late, key=lambda w: added[w])
    loaded = context_events(s.client, "loaded")
    assert new_worker in loaded, "the replacement never loaded the context"
    rerun = sum(n - 1 for n in runs.starts.values())
    logger.info(
        "%s: worker left the scheduler after %.2f s%s; replacement job in squeue after "
        "%.2f s, running after %.2f s, worker connected after %.2f s, warm (context "
        "loaded) after %.2f s; %d task starts for %d tasks (%d reran); the replacement "
        "served %d tasks",
        how, left - since,
        "" if drained is None else (
            f" (drained in {drained['seconds']:.2f} s: {len(drained['given_back'])} task(s) "
            f"given back, {len(drained['abandoned'])} given up)"
        ),
        jobs[replacement].seen - since, (jobs[replacement].running or math.nan) - since,
        added[new_worker] - since, loaded[new_worker] - since, sum(runs.starts.values()),
        tasks, rerun, sum(r["worker"] == new_worker for r in results),
    )


# ---------------------------------------------------------------- real SLURM


@pytest.mark.slurm
def test_preempted_worker_drains_during_grace_time(
    start_slurm: Callable[..., Slurm], expected: dict[str, Any]
) -> None:
    # the workers run in job steps (srun) of the 'grace' partition: when a 'high' job
    # preempts one, its step gets SIGTERM at once and SIGKILL GraceTime + KillWait later
    s = start_slurm(max_jobs=2, queue="grace", grace=f"{GRACE}s", srun=True)
    # the replacement waits for the 'high' job to end, and must still find work worth
    # a start-up and a load when it can run
    futures = two_warm_workers_at_work(s)
    before = connected(s.client)
    job_by_worker = {w: job_of(s, w) for w in before}
    victim = preempt_one_worker(s, before, seconds=4)
    drained = check_drained(s, futures, expected["verdicts"], victim, job_by_worker[victim], "grace-time preemption")
    # its job ended when the worker left, before SLURM's SIGKILL (GraceTime + KillWait
    # after the warning): however busy the machine, nothing was killed mid-drain
    job = s.jobs.snapshot()[job_by_worker[victim]]
    assert job.gone is not None and job.gone - drained["signalled"] < GRACE + KILL_WAIT


@pytest.mark.slurm
def test_cancelled_worker_drains_before_kill_wait(
    start_slurm: Callable[..., Slurm], expected: dict[str, Any]
) -> None:
    # scancel: SIGTERM to every process of the job, SIGKILL KillWait (5 s) later
    s = start_slurm(max_jobs=2, grace=f"{GRACE}s")
    futures = two_warm_workers_at_work(s)
    victim = warm_workers(s.client)[0]
    job = job_of(s, victim)
    subprocess.run(["scancel", job], check=True)
    check_drained(s, futures, expected["verdicts"], victim, job, "scancel")


@pytest.mark.slurm
def test_killed_worker_without_warning_loses_nothing(
    start_slurm: Callable[..., Slurm], expected: dict[str, Any]
) -> None:
    s = start_slurm(max_jobs=2, grace=f"{GRACE}s")
    futures = two_warm_workers_at_work(s)
    keys = {f.key for f in futures}
    victim = warm_workers(s.client)[0]
    job = job_of(s, victim)
    # as a node failure or the OOM killer would: SIGKILL to the nanny and its worker
    # process (`scancel --signal=KILL` cancels the job the usual way: SIGTERM first)
    pids = s.client.run(lambda: (os.getppid(), os.getpid()), workers=[victim])[victim]
    killed_at = time.time()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    results = wait_done(futures)
    check_results(results, expected["verdicts"])
    runs = Runs.read(s.runs)
    assert set(runs.ends) == keys
    assert victim not in drain_events(s.client)
    # what it held was recomputed, nothing else ran twice
    rerun = {k for k, n in runs.starts.items() if n > 1}
    assert rerun, "the killed worker held no result"
    assert rerun <= runs.started_on[job], "a task that never ran on the killed worker reran"
    added, removed = worker_events(s.client)
    assert victim in removed
    log_replacement(s, "SIGKILL", killed_at, removed[victim], added, results, runs, len(keys), None)


# ---------------------------------------------------------------- LocalCluster


def use_and_log(i: int, seconds: float, runs: str) -> tuple[int, str]:
    """Context task: log its start and end (key, worker) to ``runs``; take ``seconds``."""
    worker = get_worker()
    with open(runs, "a") as f:
        f.write(f"start {worker.get_current_task()} {worker.address}\n")
    dc.get_context("b")
    time.sleep(seconds)
    with open(runs, "a") as f:
        f.write(f"end {worker.get_current_task()} {worker.address}\n")
    return i, worker.address


def drain_me() -> str:
    """Task: a spot notice arrived on this worker."""
    preemption.request_drain(reason="spot notice")
    return get_worker().address


@pytest.mark.parametrize("how", ["SIGTERM", "drain", "request_drain"])
def test_drain_on_a_local_cluster(tmp_path: Path, how: str) -> None:
    runs = tmp_path / "runs"
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        dc.register(client, dc.ContextSpec("b", blob, args=["b"]))
        preemption.enable(client, grace=f"{GRACE}s")
        with dc.use("b"):
            futures = client.map(use_and_log, range(40), seconds=0.2, runs=str(runs))
        wait_until(lambda: sum(f.done() for f in futures) >= 10, 60, "work under way")
        victim = warm_workers(client, "b")[0]
        if how == "SIGTERM":
            os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGTERM)
        elif how == "drain":
            assert preemption.drain(client, [victim], reason="spot notice") == [victim]
        else:
            assert client.submit(drain_me, workers=[victim], pure=False).result() == victim
        wait(futures, timeout=60)
        assert sorted(f.result()[0] for f in futures) == list(range(40))
        wait_until(lambda: victim not in connected(client), 30, "the drained worker to leave")

        drained = drain_events(client)[victim]["drained"]
        assert drained["retired"] and drained["reason"] == ("SIGTERM" if how == "SIGTERM" else "spot notice")
        run = Runs.read(runs)
        rerun = {k for k, n in run.starts.items() if n > 1}
        assert rerun <= {str(k) for k in drained["abandoned"]} and len(rerun) <= 1 + PREFETCH
        # the results it held are on the other worker now, and were not recomputed
        moved = run.ended_on.get(victim, set()) - rerun
        assert moved and all(run.starts[k] == 1 for k in moved)
        assert {w for ws in client.who_has(futures).values() for w in ws} == connected(client)
