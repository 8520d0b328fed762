"""Routing logic, on in-process clusters (distributed's gen_cluster)."""

import asyncio
import logging
from collections import Counter

import dask
import dask.bag as db
import pytest
from distributed import Worker
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster

import dask_context as dc
from dask_context import ContextSpec
from tests.loaders import blob, broken, where

THREE = [("127.0.0.1", 1)] * 3


def spec(name, load_time=None, seconds=0.0, nbytes=1000, **kwargs):
    """A context whose load takes ``seconds`` (``load_time`` is the spec's hint)."""
    return ContextSpec(
        name, blob, args=[name], kwargs={"seconds": seconds, "nbytes": nbytes},
        load_time=load_time, **kwargs,
    )


async def report(c):
    return await c.scheduler.dask_context_report()


@gen_cluster(client=True, nthreads=THREE)
async def test_short_backlog_stays_on_one_warm_worker(c, s, *workers):
    # 40 tasks of 5 ms are not worth a second load of 0.5 s, and work stealing must
    # not hand them to the two idle workers either
    await dc.register(c, spec("A", load_time=100, seconds=0.5))
    with dc.use("A"):
        futures = c.map(where, range(40), name="A", seconds=0.005)
    results = await c.gather(futures)
    assert sorted(x for x, _ in results) == list(range(40))
    assert len({addr for _, addr in results}) == 1
    info = (await report(c))["contexts"]["A"]
    assert info["loads"] == 1 and info["tasks"] == 40 and info["queued"] == 0


@gen_cluster(client=True, nthreads=THREE)
async def test_long_backlog_warms_more_workers(c, s, *workers):
    await dc.register(c, spec("A", load_time=0.01))
    with dc.use("A"):
        futures = c.map(where, range(60), name="A", seconds=0.02)
    results = await c.gather(futures)
    used = Counter(addr for _, addr in results)
    assert len(used) == 3
    info = (await report(c))["contexts"]["A"]
    assert info["loads"] == 3 and info["warmups"] == 3


@gen_cluster(client=True, nthreads=THREE)
async def test_warm_workers_are_reused_across_computations(c, s, *workers):
    await dc.register(c, spec("A", load_time=100, seconds=0.5))
    for _ in range(3):
        with dc.use("A"):
            await c.gather(c.map(where, range(10), name="A", pure=False))
    assert (await report(c))["contexts"]["A"]["loads"] == 1


@gen_cluster(client=True, nthreads=THREE)
async def test_contexts_share_workers_by_budget(c, s, *workers):
    # each worker fits one 600-byte context: three contexts, three workers,
    # one load each, even though all tasks are submitted at once
    with dask.config.set({"dask-context.worker.memory-budget": 1000}):
        await dc.register(c, *(spec(n, load_time=100, seconds=1.0, memory=600, nbytes=500) for n in "ABC"))
    futures = []
    for n in "ABC":
        with dc.use(n):
            futures += c.map(where, range(20), name=n, seconds=0.005, key=[f"{n}-{i}" for i in range(20)])
    results = await c.gather(futures)
    per_context = {n: {a for (x, a), f in zip(results, futures, strict=True) if f.key.startswith(n)} for n in "ABC"}
    assert all(len(addrs) == 1 for addrs in per_context.values())
    assert len(set.union(*per_context.values())) == 3
    r = await report(c)
    assert [r["contexts"][n]["loads"] for n in "ABC"] == [1, 1, 1]


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_more_contexts_than_workers_wait_instead_of_thrashing(c, s, a, b):
    with dask.config.set({"dask-context.worker.memory-budget": 1000}):
        await dc.register(c, *(spec(n, load_time=100, seconds=1.0, memory=600, nbytes=500) for n in "ABC"))
    futures = []
    for n in "ABC":
        with dc.use(n):
            futures += c.map(where, range(20), name=n, seconds=0.005, key=[f"{n}-{i}" for i in range(20)])
    assert len(await c.gather(futures)) == 60
    r = await report(c)
    assert sum(r["contexts"][n]["loads"] for n in "ABC") == 3
    assert sum(r["contexts"][n]["evictions"] for n in "ABC") == 1


@gen_cluster(client=True, nthreads=THREE)
async def test_losing_the_warm_worker_reroutes_its_tasks(c, s, *workers):
    await dc.register(c, spec("A", load_time=100, seconds=1.0))
    with dc.use("A"):
        futures = c.map(where, range(30), name="A", seconds=0.01)
    await async_poll_for(lambda: any(f.status == "finished" for f in futures), timeout=10)
    warm = (await report(c))["contexts"]["A"]["warm"]
    assert len(warm) == 1
    victim = next(w for w in workers if w.address == warm[0])
    await victim.close()
    results = await c.gather(futures)
    assert sorted(x for x, _ in results) == list(range(30))
    r = (await report(c))["contexts"]["A"]
    assert r["loads"] == 2 and victim.address not in r["warm"]


@gen_cluster(client=True, nthreads=[])
async def test_tasks_wait_for_a_worker_and_run_when_one_joins(c, s):
    await dc.register(c, spec("A"))
    with dc.use("A"):
        futures = c.map(where, range(5), name="A")
    await async_poll_for(lambda: len(s.unrunnable) == 5, timeout=5)
    async with Worker(s.address, nthreads=1):
        results = await c.gather(futures)
    assert sorted(x for x, _ in results) == list(range(5))


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_unknown_context_fails_the_task_with_a_clear_error(c, s, a):
    await dc.register(c, spec("A"))
    with dc.use("nope"):
        future = c.submit(where, 1, name="nope")
    with pytest.raises(dc.UnknownContextError, match="unknown context 'nope': registered contexts are 'A'"):
        await future


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_loader_failure_reaches_the_task_and_the_worker_stays_usable(c, s, a):
    await dc.register(c, ContextSpec("bad", broken, args=["weights are corrupt"]), spec("good"))
    with dc.use("bad"):
        bad = c.submit(where, 1, name="bad")
    with pytest.raises(OSError, match="weights are corrupt") as info:
        await bad
    assert any("loading context 'bad' failed" in n for n in info.value.__notes__)
    with dc.use("good"):
        assert (await c.submit(where, 2, name="good"))[0] == 2
    assert (await report(c))["contexts"]["bad"]["failures"] == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_registering_twice(c, s, a):
    assert await dc.register(c, spec("A")) == {"A": "added"}
    # the identical spec again (a re-run script) changes nothing
    assert await dc.register(c, spec("A")) == {"A": "unchanged"}
    with captured_logger("distributed.core", level=logging.ERROR) as log, \
            pytest.raises(dc.DuplicateContextError, match="'A' is already registered with a different kwargs"):
        await dc.register(c, spec("A", seconds=1.0))
    # the user's mistake is not an error of the scheduler
    assert "Exception while handling op" not in log.getvalue()
    assert await dc.register(c, spec("A", seconds=0.1), spec("B"), replace=True) == {
        "A": "replaced", "B": "added"}
    assert len([p for p in s.plugins if p == "dask-context"]) == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_bag_and_delayed_tasks_are_routed(c, s, a):
    await dc.register(c, spec("A"))

    @dc.delayed("A")
    def double(x):
        return 2 * dc.get_context("A")["data"].__len__() * 0 + 2 * x

    total = dask.delayed(sum)([double(i) for i in range(5)])
    assert await c.compute(total) == 20
    bag = db.from_sequence(range(10), npartitions=5).map(lambda x: (dc.get_context("A")["name"], x))
    with dc.use("A"):
        assert len(await c.compute(bag)) == 10
    # 5 delayed tasks + the bag's 5 partitions; the delayed sum and the bag's
    # finalize step are Dask's own plumbing and are not routed
    assert (await report(c))["contexts"]["A"]["tasks"] == 5 + 5


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_events_and_eager_loading(c, s, a, b):
    await dc.register(c, spec("E", eager=True))
    await async_poll_for(
        lambda: sum(e["action"] == "loaded" for _, e in s.get_events("dask-context")) == 2, timeout=10
    )
    events = [e for _, e in s.get_events("dask-context")]
    assert {e["worker"] for e in events if e["action"] == "loaded"} == {a.address, b.address}
    r = await report(c)
    assert list(r["contexts"]["E"]["warm"]) == sorted([a.address, b.address])


@gen_cluster(client=True, nthreads=THREE, config={"dask-context.adaptive.keep-warm": "1h"})
async def test_scale_in_keeps_warm_workers(c, s, *workers):
    await dc.register(c, spec("A", load_time=100, seconds=0.5))
    with dc.use("A"):
        await c.gather(c.map(where, range(5), name="A"))
    warm = set((await report(c))["contexts"]["A"]["warm"])
    assert len(warm) == 1
    closable = set(s.workers_to_close(n=3))
    assert closable and not closable & warm


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_adaptive_target_counts_load_time_and_holds_during_the_first_load(c, s, a):
    await dc.register(c, spec("A", load_time=1, seconds=2))

    def target():
        return c.scheduler.dask_context_target(target_duration=1, startup=1)

    with dc.use("A"):
        futures = c.map(where, range(30), name="A", seconds=0.01)
    # the worker loads A (2 s) before it gets any task: scaling must not drop its
    # target meanwhile (adapt would cancel the workers it has just asked for):
    # 30 queued tasks x 0.5 s (no duration known) over (1 s start-up + 1 s load)
    await async_poll_for(
        lambda: any(e["action"] == "loading" for _, e in s.get_events("dask-context")), timeout=5
    )
    assert await target() >= 7
    await asyncio.sleep(0.5)
    assert await target() >= 7
    await c.gather(futures)
    del futures
    await async_poll_for(lambda: not s.tasks, timeout=5)
    assert await target() == 1  # no work, nothing held: only what keep-warm protects


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_plugins_registered_by_hand_route_too(c, s, a):
    # an existing deployment: plain client.register_plugin, no dask_context.register
    await c.register_plugin(dc.ContextRouter())
    await c.register_plugin(dc.ContextPlugin(spec("A", seconds=0.1)))
    with dc.use("A"):
        assert len(await c.gather(c.map(where, range(6), name="A"))) == 6
    r = (await report(c))["contexts"]["A"]
    assert r["tasks"] == 6 and r["loads"] == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)], clean_kwargs={"threads": False})
async def test_prometheus_metrics_on_the_scheduler(c, s, a):
    from tornado.httpclient import AsyncHTTPClient

    await dc.register(c, spec("A", seconds=0.1))
    with dc.use("A"):
        await c.gather(c.map(where, range(4), name="A"))
    response = await AsyncHTTPClient().fetch(f"http://localhost:{s.http_server.port}/metrics")
    text = response.body.decode()
    assert 'dask_context_loads_total{context="A"} 1.0' in text
    assert 'dask_context_tasks_total{context="A"} 4.0' in text
    assert 'dask_context_warm_workers{context="A"} 1.0' in text
