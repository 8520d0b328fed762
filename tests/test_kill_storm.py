"""A kill storm on real process workers: every killed worker comes back, no result is lost.

A SIGKILL every 1.5 s for 10 s on 3 process workers of a LocalCluster (1 thread
each) while 300 context tasks run (``benchmarks.kill_storm``, sized down). Each
nanny must restart its worker every time, and the replacement must join the
scheduler and set dask-context up again (its worker plugins, the settings it
inherits, the drain plugin), so the cluster ends with all its workers and every
result arrives exactly once. A replacement that never joins fails the test: its
name stays off the scheduler (``never_back``) and the cluster ends a worker short.

The harness sets ``distributed.deploy.lost-worker-timeout`` to an hour: with Dask's
default (15 s) a LocalCluster closes for good any nanny whose worker name happens
to be off the scheduler (between a kill and the replacement's registration) 15 s
after an earlier removal of that name, which a storm makes likely with or without
dask-context; that is Dask's policy for lost batch jobs, not a failed restart.
"""

from __future__ import annotations

import pytest

from benchmarks.kill_storm import run

WORKERS = 3
TASKS = 300


@pytest.mark.timeout(120)
def test_kill_storm_every_worker_comes_back_and_nothing_is_lost(model_dir):
    out = run(
        tasks=TASKS, workers=WORKERS, interval=1.5, duration=10.0, model_dir=str(model_dir),
        # the client gives up on missing results after this long; the cluster then
        # gets `settle` seconds to have all its workers connected again (polled)
        timeout=90.0, settle=20.0,
    )
    detail = {k: v for k, v in out.items() if k != "nannies"} | {"nannies": out["nannies"]}
    assert out["kills"] >= 4, detail  # it was a storm
    # every result arrives, once and correct; none failed, none left pending or lost
    assert not out["gave_up"], detail
    assert out["results"] == TASKS and out["exactly_once_and_correct"], detail
    assert out["errors"] == 0 and out["pending"] == 0 and out["lost"] == 0, detail
    # each kill was followed by a restart, and each replacement joined the scheduler
    assert out["nanny_restarts"] >= out["kills"] and out["failed_restarts"] == 0, detail
    assert out["downtime"]["removals"] >= out["kills"], detail
    assert out["downtime"]["never_back"] == 0, detail
    # all workers back at the end, each nanny running its worker process
    assert out["workers_at_end"] == WORKERS, detail
    assert len(out["nannies"]) == WORKERS, detail
    assert all(n["nanny"] == "running" and n["process"] == "running" for n in out["nannies"]), detail
