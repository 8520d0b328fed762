"""The router's work per task does not grow with the cluster.

A real Scheduler and the real router with simulated workers
(:mod:`benchmarks.router_scale`): workers are looked at when an event concerns them
(a slot opened there, a context they serve got tasks), plus at most one scan of the
workers per routing tick while routed tasks wait. A router that walked the workers on
every event would look at ``tasks x workers`` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import dask
import pytest

from benchmarks import router_scale
from dask_context import _compat

TASKS = 2000


@pytest.fixture
def examined(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the workers the routing loop examines for a free slot."""
    count = [0]
    is_running = _compat.is_running

    def counting(*args, **kwargs):
        count[0] += 1
        return is_running(*args, **kwargs)

    monkeypatch.setattr(_compat, "is_running", counting)
    return count


@pytest.mark.parametrize("contexts", [1, 20])
def test_workers_examined_per_task_do_not_grow_with_the_workers(examined, monkeypatch, contexts):
    ticks = []
    periodic = router_scale.ContextRouter._periodic

    def counted(self):
        ticks.append(None)
        periodic(self)

    monkeypatch.setattr(router_scale.ContextRouter, "_periodic", counted)
    per_task = {}
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False,
                          "distributed.scheduler.worker-ttl": None}):
        for workers in (8, 160):
            examined[0] = 0
            ticks.clear()
            out = asyncio.run(router_scale.run(workers, contexts, TASKS, routed=True))
            assert out["tasks"] == TASKS
            # one look per finished task (its slot opened), the burst of new tasks,
            # and one scan per tick while tasks waited: nothing per event scales
            bound = 2 * TASKS + (len(ticks) + 2) * workers
            assert examined[0] <= bound, (workers, examined[0], len(ticks))
            per_task[workers] = (examined[0] - len(ticks) * workers) / TASKS
    # twenty times the workers: the looks due to events stay about one per task
    assert per_task[160] <= per_task[8] + 1.0, per_task


@contextlib.asynccontextmanager
async def _full_cluster(nworkers: int) -> AsyncIterator[tuple[Any, list[Any]]]:
    """A scheduler with the router and ``nworkers`` simulated workers warm for one
    context, each running one of its tasks and holding one more (prefetch) while
    as many again wait in the router's queue; yields the router and the workers."""
    from distributed import Client, Scheduler
    from distributed.comm.inproc import global_manager

    import dask_context
    from dask_context.scheduler import ContextRouter

    spec = dask_context.ContextSpec("c0", dict)
    async with Scheduler(protocol="inproc", dashboard=False, validate=False) as s:
        workers = [
            router_scale.SimulatedWorker(s.address, "inproc://" + global_manager.new_address(),
                                         ["c0"], {"c0": spec.token}, hold=True)
            for _ in range(nworkers)
        ]
        await asyncio.gather(*(w.start() for w in workers))
        async with Client(s.address, asynchronous=True) as client:
            await client.register_plugin(ContextRouter([spec]))
            await asyncio.gather(*(w.announce(s.rpc(s.address)) for w in workers))
            with dask_context.use("c0"):
                futures = client.map(router_scale._touch, range(4 * nworkers), context="c0")
            while sum(len(w.held) for w in workers) < 2 * nworkers:
                await asyncio.sleep(0.01)
            yield s.plugins["dask-context"], workers
            del futures
        await asyncio.gather(*(w.close() for w in workers))


async def _one_finished_task(nworkers: int, examined: list[int]) -> int:
    """Workers examined after one task finishes on a full cluster of ``nworkers``."""
    async with _full_cluster(nworkers) as (_, workers):
        examined[0] = 0
        await workers[0].finish(1)
        while len(workers[0].held) < 2:
            await asyncio.sleep(0.001)
        return examined[0]


def test_one_finished_task_makes_the_router_look_at_its_worker_only(examined):
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False,
                          "distributed.scheduler.worker-ttl": None}):
        for workers in (8, 160):
            seen = asyncio.run(_one_finished_task(workers, examined))
            # its worker, and at most a routing tick's scan of workers with a free
            # slot (that one worker, again)
            assert seen in (1, 2), (workers, seen)


async def _replans_on_a_full_cluster(nworkers: int, seconds: float) -> tuple[int, int]:
    """Plans made, and routing ticks, during ``seconds`` in which every worker of a
    cluster of ``nworkers`` runs a context task while more of them wait."""
    async with _full_cluster(nworkers) as (router, _):
        plans, ticks = [0], [0]
        replan, periodic = router._replan, router._periodic
        router._replan = lambda: (plans.__setitem__(0, plans[0] + 1), replan())
        router._periodic = lambda: (ticks.__setitem__(0, ticks[0] + 1), periodic())
        router.scheduler.periodic_callbacks["dask-context"].callback = router._periodic
        await asyncio.sleep(seconds)
        assert router.state.contexts["c0"].waiting == 2 * nworkers
        return plans[0], ticks[0]


def test_a_full_cluster_is_not_replanned_every_tick():
    # a plan looks at every worker, and spreads work only onto idle ones: with none,
    # only the tidying plan every fifth tick runs, however long the queue (and the
    # one due once the new work has settled, if it comes after the count starts)
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False,
                          "distributed.scheduler.worker-ttl": None}):
        plans, ticks = asyncio.run(_replans_on_a_full_cluster(64, 2.0))
    assert ticks >= 5, ticks
    assert plans <= ticks // 5 + 2, (plans, ticks)


COUNTED_TASKS = 3000


def test_calls_per_event_do_not_grow_with_the_workers_or_the_contexts():
    # the calls made inside the router (the benchmark's counting pass), not its
    # time: a count is the same on a slow machine as on a fast one. Planning (it
    # looks at every worker, and is bounded by a share of the scheduler's time),
    # the routing tick's housekeeping (it runs by the clock) and the scheduler's own
    # transitions (they send one message per worker fed, so more when the tasks
    # spread over more workers) are counted apart: what is left is the router's work
    # on each scheduler event
    per_event = {}
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False,
                          "distributed.scheduler.worker-ttl": None}):
        for contexts in (1, 100):
            for workers in (16, 256):
                out = asyncio.run(router_scale.run(workers, contexts, COUNTED_TASKS,
                                                   routed=True, count=True))
                assert out["tasks"] == COUNTED_TASKS
                per_event[contexts, workers] = out["event_calls_per_task"]
    assert all(calls > 0 for calls in per_event.values()), per_event
    # sixteen times the workers: the router's work per event stays the same (runs
    # of the same size differ by a few percent, with how the events were batched)
    for contexts in (1, 100):
        assert per_event[contexts, 256] <= 1.1 * per_event[contexts, 16], per_event
    # a hundred times the contexts, each worker still holding one
    assert per_event[100, 256] <= 1.1 * per_event[1, 256], per_event


def test_the_counting_pass_fails_when_the_router_is_entered_through_an_untimed_method(monkeypatch):
    # the timed runs wrap only the router's entry points: were Dask to call one that
    # entry_points leaves out, its work would go untimed, and the counting pass says so
    entry_points = router_scale.entry_points

    def without_the_transition_hook(scheduler, router):
        entries = entry_points(scheduler, router)
        entries[router].discard("transition")
        return entries

    monkeypatch.setattr(router_scale, "entry_points", without_the_transition_hook)
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False,
                          "distributed.scheduler.worker-ttl": None}):
        with pytest.raises(RuntimeError, match=r"ContextRouter\.transition\b"):
            asyncio.run(router_scale.run(4, 1, 200, routed=True, count=True))
        # and with every entry listed, the same run passes and is timed whole
        monkeypatch.setattr(router_scale, "entry_points", entry_points)
        out = asyncio.run(router_scale.run(4, 1, 200, routed=True))
    assert out["tasks"] == 200 and out["router_us_per_task"] > out["own_us_per_task"] > 0
