"""The router's guarantees, on in-process clusters (distributed's gen_cluster).

Nothing is stranded (any error inside the router hands tasks back to Dask), one bad
node does not fail a run, registration changes during loads are safe, counts mean
what they say, and nothing is left behind for keys, workers or contexts that are gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import dask
import dask.bag as db
import pytest
from distributed import Client, Event, Worker, wait
from distributed.utils_test import async_poll_for, gen_cluster

import dask_context as dc
import dask_context._router_loop
from dask_context import ContextRouter, ContextSpec
from dask_context._protocol import ROUTER_METADATA
from dask_context.state import RouterState
from tests.loaders import always_fails, blob, fails_first_time, fails_on, fails_slowly_on, where

ONE = [("127.0.0.1", 1)]
THREE = [("127.0.0.1", 1)] * 3


def spec(name, seconds=0.0, nbytes=1000, **kwargs):
    return ContextSpec(name, blob, args=[name], kwargs={"seconds": seconds, "nbytes": nbytes}, **kwargs)


def router(s):
    return s.plugins["dask-context"]


async def report(c):
    return await c.scheduler.dask_context_report()


def identity(x):
    dc.get_context("A")
    return x


@contextmanager
def router_log() -> Iterator[list[logging.LogRecord]]:
    """The records the router logs while the block runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("dask_context.scheduler")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def errors(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------- 1. never stranded
@gen_cluster(client=True, nthreads=[])
async def test_tasks_with_equal_priority_and_mixed_keys_are_queued_and_run(c, s):
    # a str key and a tuple key, submitted in one fifo window: equal priorities
    await dc.register(c, spec("A"))
    with dc.use("A"):
        f1 = c.submit(identity, 1, key="plain-key")
        f2 = c.submit(identity, 2, key=("tuple-key", 0))
        bag = db.from_sequence([3, 4], npartitions=2).map(identity)
        f3 = c.compute(bag)
    await async_poll_for(lambda: len(s.unrunnable) == 4, timeout=5)
    assert s.tasks["plain-key"].priority == s.tasks[("tuple-key", 0)].priority
    assert (await report(c))["contexts"]["A"]["queued"] == 4
    async with Worker(s.address, nthreads=1):
        assert await c.gather([f1, f2, f3]) == [1, 2, [3, 4]]


@gen_cluster(client=True, nthreads=ONE)
async def test_an_error_in_routing_hands_tasks_back_to_dask(c, s, a):
    await dc.register(c, spec("A"))

    def broken(*args, **kwargs):
        raise RuntimeError("bug in the planner")

    original = dask_context._router_loop.plan_routes
    dask_context._router_loop.plan_routes = broken
    try:
        with dc.use("A"):
            futures = c.map(identity, range(20))
        assert await c.gather(futures) == list(range(20))
    finally:
        dask_context._router_loop.plan_routes = original
    assert not router(s).state.tasks
    assert not any(ts.worker_restrictions for ts in s.tasks.values())


@gen_cluster(client=True, nthreads=ONE)
async def test_an_error_in_a_transition_hook_hands_that_task_back(c, s, a):
    await dc.register(c, spec("A"))
    original = RouterState.enqueue

    def flaky(self, task):
        if task.key == "victim":
            raise RuntimeError("bug while queueing")
        return original(self, task)

    RouterState.enqueue = flaky
    try:
        with dc.use("A"):
            futures = [c.submit(identity, 0, key="victim"), *c.map(identity, range(1, 10))]
        assert await c.gather(futures) == list(range(10))
    finally:
        RouterState.enqueue = original
    assert (await report(c))["contexts"]["A"]["tasks"] == 9  # the victim ran unrouted


@gen_cluster(client=True, nthreads=ONE)
async def test_errors_in_router_hooks_are_logged_at_error(c, s, a):
    await dc.register(c, spec("A"))
    original = dask_context._router_loop.plan_routes
    dask_context._router_loop.plan_routes = lambda *a, **k: 1 / 0
    try:
        with router_log() as records, dc.use("A"):
            assert await c.submit(identity, 1) == 1
    finally:
        dask_context._router_loop.plan_routes = original
    logged = [r for r in records if r.levelno == logging.ERROR]
    assert logged and "go back to Dask's own scheduling" in logged[0].getMessage()
    assert logged[0].exc_info[0] is ZeroDivisionError


async def park_some(c, s):
    """Tasks of "A" in memory (restricted to the workers they ran on when placed)
    and tasks of "B" parked while B loads (2 s)."""
    await dc.register(c, spec("A"), spec("B", seconds=2.0))
    with dc.use("A"):
        held = c.map(where, range(4), name="A", pure=False)
    await wait(held)
    with dc.use("B"):
        parked = c.map(where, range(20), name="B", pure=False)
    await async_poll_for(lambda: router(s).state.contexts["B"].waiting == 20, timeout=5)
    return held, parked


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_a_router_removed_from_the_scheduler_gives_every_task_back(c, s, a, b):
    held, parked = await park_some(c, s)
    old = router(s)
    with router_log() as records:
        # distributed removes a plugin without closing it: its hooks stop
        await c.unregister_scheduler_plugin("dask-context")
        assert len(await asyncio.wait_for(c.gather(parked), timeout=20)) == 20
        # results lost with their worker are recomputed elsewhere, not pinned to it
        holder = next(iter(s.tasks[held[0].key].who_has)).address
        await (a if a.address == holder else b).close()
        assert [x for x, _ in await asyncio.wait_for(c.gather(held), timeout=20)] == list(range(4))
    assert any("removed from the scheduler" in r.getMessage() for r in records)
    assert not any(ts.worker_restrictions for ts in s.tasks.values())
    assert s.get_metadata(ROUTER_METADATA) is False
    assert "dask-context" not in s.periodic_callbacks and not old._pc.is_running()


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_a_router_replaced_by_another_leaves_it_in_charge(c, s, a, b):
    _, parked = await park_some(c, s)
    old = router(s)
    replacement = ContextRouter()
    replacement.idempotent = False  # distributed replaces a plugin of the same name
    with pytest.warns(UserWarning, match="already contains a plugin"):
        await c.register_plugin(replacement, name="dask-context")
    new = router(s)
    assert new is not old
    assert len(await asyncio.wait_for(c.gather(parked), timeout=20)) == 20
    await async_poll_for(lambda: not old._pc.is_running(), timeout=5)
    assert s.periodic_callbacks["dask-context"] is new._pc and new._pc.is_running()
    assert s.get_metadata(ROUTER_METADATA) is True
    await dc.register(c, spec("A"))
    with dc.use("A"):
        assert len(await c.gather(c.map(where, range(10), name="A", pure=False))) == 10
    assert (await report(c))["contexts"]["A"]["tasks"] == 10


# ---------------------------------------------------------------- resources
CPU_AND_GPU = [("127.0.0.1", 1, {"resources": {"CPU": 1}}), ("127.0.0.1", 1, {"resources": {"GPU": 1}})]


@gen_cluster(client=True, nthreads=CPU_AND_GPU)
async def test_tasks_that_ask_for_resources_go_to_workers_that_have_them(c, s, cpu, gpu):
    await dc.register(c, spec("A", seconds=0.2))
    with router_log() as records:
        with dc.use("A"):
            first = await c.gather(c.map(where, range(4), name="A", resources={"CPU": 1}))
        assert {w for _, w in first} == {cpu.address}
        # warm on the CPU worker only: tasks that ask for a GPU need the other one,
        # beside tasks that ask for nothing (before, they waited for the stall guard)
        with dc.use("A"):
            gpu_tasks = c.map(where, range(10), name="A", resources={"GPU": 1}, pure=False)
            any_tasks = c.map(where, range(10, 20), name="A", pure=False)
        done = await asyncio.wait_for(c.gather(gpu_tasks + any_tasks), timeout=10)
    assert [x for x, _ in done] == list(range(20))
    assert {w for _, w in done[:10]} == {gpu.address}
    assert not errors(records)
    r = (await report(c))["contexts"]["A"]
    assert r["tasks"] == 24 and r["loads"] == 2, r


@gen_cluster(client=True, nthreads=ONE, config={"dask-context.scheduler.stall-margin": "0.5s"})
async def test_tasks_that_ask_for_resources_no_worker_has_wait_for_one(c, s, a):
    await dc.register(c, spec("A", seconds=0.1, load_time=0.1))
    with router_log() as records:
        with dc.use("A"):
            futures = c.map(where, range(5), name="A", resources={"GPU": 1}, pure=False,
                            priority=10)
            others = c.map(where, range(10, 20), name="A", pure=False)
        # they hold back no task behind them that the worker can run (before, those
        # waited behind them for the stall guard: 60 s)
        done = await asyncio.wait_for(c.gather(others), timeout=10)
        assert {w for _, w in done} == {a.address}
        await async_poll_for(lambda: router(s).state.contexts["A"].waiting == 5, timeout=5)
        # waiting is right here (as for Dask's own tasks): nothing may happen for
        # several times the stall guard's delay (load time + margin) while the
        # worker that could load the context idles without the resources
        await asyncio.sleep(1.5)
        assert router(s).state.contexts["A"].waiting == 5
        assert all(s.tasks[f.key].state == "no-worker" for f in futures)
        async with Worker(s.address, nthreads=1, resources={"GPU": 1}) as gpu:
            done = await asyncio.wait_for(c.gather(futures), timeout=10)
    assert {w for _, w in done} == {gpu.address}
    assert not errors(records)


# ---------------------------------------------------------------- 2. one bad node
@gen_cluster(client=True, nthreads=THREE)
async def test_one_bad_node_does_not_fail_the_run(c, s, *workers):
    bad = workers[0]
    await dc.register(c, ContextSpec("A", fails_on, args=[[bad.address]], kwargs={"seconds": 0.2}, load_time=0.01))
    with dc.use("A"):
        futures = c.map(where, range(300), name="A", seconds=0.002)
    results = await c.gather(futures)
    assert sorted(x for x, _ in results) == list(range(300))
    assert bad.address not in {addr for _, addr in results}
    # the bad node's failure may be reported after the good ones finished the work
    await async_poll_for(lambda: router(s).state.contexts["A"].failures, timeout=10)
    r = (await report(c))["contexts"]["A"]
    assert r["failures"] == 1 and list(r["failed_on"]) == [bad.address]
    assert r["tasks"] == 300 and r["loads"] <= 2


@gen_cluster(client=True, nthreads=THREE)
async def test_a_loader_that_fails_once_then_works(c, s, *workers):
    import tempfile

    marker = tempfile.mktemp(prefix="dask-context-flaky-")
    await dc.register(c, ContextSpec("A", fails_first_time, args=[marker]))
    with dc.use("A"):
        futures = c.map(where, range(200), name="A")
    results = await c.gather(futures)
    assert len(results) == 200
    assert (await report(c))["contexts"]["A"]["failures"] == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_a_context_that_fails_everywhere_fails_its_tasks_with_the_loaders_error(c, s, a, b):
    await dc.register(c, ContextSpec("A", always_fails, args=["libcuda.so.1: cannot open shared object file"]))
    with dc.use("A"):
        futures = c.map(where, range(50), name="A")
    await wait(futures)
    assert all(f.status == "error" for f in futures)
    with pytest.raises(RuntimeError, match=r"libcuda\.so\.1") as info:
        await futures[-1]
    # the loader's own traceback, and a note naming the context
    assert "always_fails" in {frame.name for frame in info.traceback}
    assert any("loading context 'A' failed" in n for n in info.value.__notes__)
    r = (await report(c))["contexts"]["A"]
    # each worker tried once; no task was run over and over on a broken worker
    assert r["failures"] == 2 and r["queued"] == 0 and r["tasks"] == 0


@gen_cluster(client=True, nthreads=THREE, config={"dask-context.scheduler.failed-load-workers": 2})
async def test_failed_load_workers_limits_how_many_workers_try(c, s, *workers):
    # a long expected load: one worker tries at a time, and the third never does
    await dc.register(c, ContextSpec("A", always_fails, load_time=100))
    with dc.use("A"):
        futures = c.map(where, range(30), name="A", seconds=0.01)
    await wait(futures)
    assert all(f.status == "error" for f in futures)
    assert (await report(c))["contexts"]["A"]["failures"] == 2


@gen_cluster(client=True, nthreads=THREE, config={"dask-context.scheduler.failed-load-workers": 2})
async def test_once_failed_load_workers_failed_no_new_worker_starts_a_load(c, s, *workers):
    # two loads fail at once, the third is still running: the tasks wait for it,
    # and a worker that joins meanwhile (as a restarted one would) must not try too,
    # or a stream of newcomers would keep the tasks waiting forever
    slow = workers[2]
    await dc.register(c, ContextSpec("A", fails_slowly_on, args=[[slow.address], 1.5], load_time=0.01))
    with dc.use("A"):
        futures = c.map(where, range(30), name="A")
    await async_poll_for(lambda: len(router(s).state.contexts["A"].failed_on) == 2, timeout=10)
    assert "A" in slow.extensions["dask-context"].cache.loading()
    async with Worker(s.address, nthreads=1) as newcomer:
        await wait(futures)
        assert all(f.status == "error" for f in futures)
        r = (await report(c))["contexts"]["A"]
        # the newcomer's load would have failed at once
        assert r["failures"] == 3 and newcomer.address not in r["failed_on"]


@gen_cluster(client=True, nthreads=ONE, config={"dask-context.worker.failed-load-retry": "200ms"})
async def test_after_failed_load_retry_the_context_is_tried_again(c, s, a):
    import tempfile

    marker = tempfile.mktemp(prefix="dask-context-flaky-")
    await dc.register(c, ContextSpec("A", fails_first_time, args=[marker]))
    with dc.use("A"):
        with pytest.raises(ConnectionError, match="hiccuped"):
            await c.submit(where, 1, name="A")
    await asyncio.sleep(0.3)
    with dc.use("A"):
        assert (await c.submit(where, 2, name="A"))[0] == 2


# ---------------------------------------------------------------- 4. registration
@gen_cluster(client=True, nthreads=ONE)
async def test_replace_during_a_load_runs_the_new_loader(c, s, a):
    await dc.register(c, ContextSpec("A", blob, args=["old"], kwargs={"seconds": 1.0}))
    with dc.use("A"):
        first = c.submit(lambda: dc.get_context("A")["name"], pure=False)
    await async_poll_for(lambda: "A" in a.extensions["dask-context"].cache.loading(), timeout=5)
    await dc.register(c, ContextSpec("A", blob, args=["new"]), replace=True)
    with dc.use("A"):
        later = c.map(lambda i: dc.get_context("A")["name"], range(5))
    assert set(await c.gather(later)) == {"new"}
    await first  # the task that started the old load finishes too
    await async_poll_for(lambda: not a.extensions["dask-context"].cache.loading(), timeout=5)
    assert a.extensions["dask-context"].cache.get("A")["name"] == "new"


@gen_cluster(client=True, nthreads=ONE)
async def test_unregister_during_a_load_removes_it_everywhere_and_allows_it_again(c, s, a):
    await dc.register(c, spec("A", seconds=1.0))
    with dc.use("A"):
        running = c.submit(where, 0, name="A")
        queued = c.map(where, range(1, 6), name="A")
    await async_poll_for(lambda: "A" in a.extensions["dask-context"].cache.loading(), timeout=5)
    await dc.unregister(c, "A")
    for f in queued:
        with pytest.raises(dc.UnknownContextError, match="unknown context 'A'"):
            await f
    await wait(running)
    await async_poll_for(lambda: not a.extensions["dask-context"].cache.loading(), timeout=5)
    assert a.extensions["dask-context"].cache.resident_bytes() == {}
    assert "A" not in (await report(c))["contexts"]
    assert not router(s).state.tasks
    assert await dc.register(c, spec("A")) == {"A": "added"}
    with dc.use("A"):
        assert (await c.submit(where, 7, name="A"))[0] == 7


@gen_cluster(client=True, nthreads=ONE)
async def test_unregister_of_an_unknown_context_says_so(c, s, a):
    await dc.register(c, spec("A"))
    with pytest.raises(dc.UnknownContextError, match="unknown context 'nope': registered contexts are 'A'"):
        await dc.unregister(c, "nope")


# ---------------------------------------------------------------- 6. sizes
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2, config={"dask-context.worker.memory-budget": 10_000})
async def test_unknown_sizes_are_not_packed_onto_one_worker(c, s, a, b):
    # three 8 kB contexts, no size declared, budget of one per worker: 3 loads
    await dc.register(c, *(spec(n, seconds=0.2, nbytes=8000, load_time=60) for n in "ABC"))
    futures = []
    for n in "ABC":
        with dc.use(n):
            futures += c.map(where, range(30), name=n, seconds=0.005, key=[f"{n}-{i}" for i in range(30)])
    assert len(await c.gather(futures)) == 90
    r = (await report(c))["contexts"]
    assert sum(r[n]["loads"] for n in "ABC") == 3, r
    assert sum(r[n]["evictions"] for n in "ABC") == 1


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2, config={"dask-context.worker.memory-budget": 10_000})
async def test_sizes_declared_ten_times_wrong_are_corrected_by_measurement(c, s, a, b):
    for declared in (80_000, 800):  # ten times too large, ten times too small
        names = [f"{n}{declared}" for n in "ABC"]
        await dc.register(c, *(spec(n, seconds=0.2, nbytes=8000, memory=declared, load_time=60) for n in names))
        futures = []
        for n in names:
            with dc.use(n):
                futures += c.map(where, range(30), name=n, seconds=0.005, key=[f"{n}-{i}" for i in range(30)])
        assert len(await c.gather(futures)) == 90
        r = (await report(c))["contexts"]
        assert all(7000 < r[n]["nbytes"] < 10_000 for n in names)
        # no thrash: at most two loads per context (the minimum is one each)
        assert sum(r[n]["loads"] for n in names) <= 6, r
        # a context loaded beside a busy one on a too-small estimate goes once it
        # has no work there (the router asks): the budget holds again
        await async_poll_for(
            lambda: all(w.extensions["dask-context"].cache.used_bytes() <= 10_000 for w in (a, b)),
            timeout=5,
        )


# ---------------------------------------------------------------- 7. one task while loading
@gen_cluster(client=True, nthreads=[("127.0.0.1", 2)])
async def test_unmeasured_loads_take_turns_and_no_thread_waits_for_one(c, s, a):
    # sizes declared but never measured here: the worker loads one at a time (two
    # estimates that are too small must not overrun the budget together)
    await dc.register(c, spec("A", seconds=1.0, memory=1000), spec("B", seconds=0.2, memory=1000))
    with dc.use("A"):
        slow = c.map(where, range(4), name="A", key=[f"A-{i}" for i in range(4)])
    await async_poll_for(lambda: "A" in a.extensions["dask-context"].cache.loading(), timeout=5)
    cache = a.extensions["dask-context"].cache
    with dc.use("B"):
        fast = c.map(where, range(20), name="B", key=[f"B-{i}" for i in range(20)])
    await asyncio.sleep(0.3)
    # B waits for its turn to load, queued on the scheduler: no thread holds one of its tasks
    assert cache.loading() == ["A"]
    assert not any(ts.key.startswith("B-") for ts in s.workers[a.address].processing)
    await c.gather(fast + slow)
    r = (await report(c))["contexts"]
    assert (r["A"]["loads"], r["B"]["loads"]) == (1, 1)
    # every task found its context warm: none waited for a load on a thread
    assert (r["A"]["hits"], r["B"]["hits"]) == (4, 20)


# ---------------------------------------------------------------- 8. counts
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_counts_mean_what_they_say_and_nothing_is_left_behind(c, s, a, b):
    await dc.register(c, spec("A", seconds=0.1))
    with dc.use("A"):
        bag = db.from_sequence(range(40), npartitions=10).map_partitions(
            lambda part: [dc.get_context("A")["name"] for _ in part]
        )
    # built inside use(), computed outside: still routed, and only the 10 mapped
    # partitions count as context tasks (not the aggregate)
    assert len(await c.compute(bag)) == 40
    r = (await report(c))["contexts"]["A"]
    # every task found the context warm: workers load before they get tasks
    assert r["tasks"] == 10 and r["hits"] == 10 and r["loads"] >= 1 and r["requeued"] == 0
    # cancelling running tasks is not a requeue
    ev = Event()
    with dc.use("A"):
        blocked = c.map(lambda i, ev: ev.wait() or i, range(4), ev=ev)
    await async_poll_for(lambda: any(w.state.executing for w in (a, b)), timeout=5)
    await c.cancel(blocked)
    await ev.set()
    assert (await report(c))["contexts"]["A"]["requeued"] == 0
    del bag, blocked
    await async_poll_for(lambda: not s.tasks, timeout=5)
    assert not router(s).state.tasks
    # a size refusal is a failure
    with dask.config.set({"dask-context.worker.memory-budget": 100}):
        async with Worker(s.address, nthreads=1) as small:
            await dc.register(c, spec("big", nbytes=5000))
            with dc.use("big"):
                await wait(c.submit(where, 1, name="big", workers=[small.address], allow_other_workers=False))
    # (tasks pinned with workers= are not routed; the load happened and failed)
    assert (await report(c))["contexts"]["big"]["failures"] >= 1
    # contexts that are gone leave nothing behind
    await dc.unregister(c, "A", "big")
    st = router(s).state
    assert not st.contexts and not st.tasks
    assert all(not (w.chosen or w.resident or w.tasks or w.failed) for w in st.workers.values())


@gen_cluster(client=True, nthreads=THREE)
async def test_only_tasks_that_run_user_code_are_routed(c, s, *workers):
    await dc.register(c, spec("A", seconds=0.1))
    bag = db.from_sequence(range(30), npartitions=6)
    with dc.use("A"):
        total = bag.map(identity).sum()
    assert await c.compute(total) == sum(range(30))
    # the 6 partitions (map fused into them); not the aggregate nor the aliases
    assert (await report(c))["contexts"]["A"]["tasks"] == 6


@gen_cluster(client=True, nthreads=ONE)
async def test_worker_restart_keeps_nothing_stale(c, s, a):
    await dc.register(c, spec("A"))
    with dc.use("A"):
        await c.gather(c.map(where, range(5), name="A"))
    assert router(s).state.workers[a.address].resident
    await a.close()
    await async_poll_for(lambda: not s.workers, timeout=5)
    assert a.address not in router(s).state.workers
    assert not (await report(c))["contexts"]["A"]["warm"]


# ---------------------------------------------------------------- unmarked tasks
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2, config={"dask-context.worker.memory-budget": 10_000})
async def test_unmarked_tasks_that_call_get_context_are_learned_and_routed(c, s, a, b):
    # three 8 kB contexts, one per worker's budget, and no use() anywhere: the
    # first task of each bag reports its context and the rest of the bag is routed
    await dc.register(c, *(spec(n, seconds=0.3, nbytes=8000) for n in "ABC"))
    bags = [
        db.from_sequence(range(60), npartitions=30).map_partitions(
            lambda part, n=n: [(dc.get_context(n)["name"], x) for x in part]
        )
        for n in "ABC"
    ]
    with pytest.warns(UserWarning, match=r"call get_context\('A'\) but were not marked"):
        results = await c.gather(c.compute(bags))
        await asyncio.sleep(0.1)  # the warning event reaches the client
    assert [sorted({name for name, _ in r}) for r in results] == [["A"], ["B"], ["C"]]
    r = (await report(c))["contexts"]
    routed = {n: r[n]["tasks"] for n in "ABC"}
    loads = sum(r[n]["loads"] for n in "ABC")
    # each bag's first tasks went back to the router instead of loading: all routed
    assert all(routed[n] == 30 for n in "ABC"), routed
    assert loads <= 4, r  # unrouted, the 90 tasks thrash: a load every few tasks
    assert set(router(s).learned.values()) == {"A", "B", "C"}


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_the_unmarked_task_warning_reaches_the_client_that_submitted_them(c, s, a):
    await dc.register(c, spec("A"))
    seen: dict[str, list[str]] = {"registering": [], "submitting": []}
    async with Client(s.address, asynchronous=True) as other:
        c.subscribe_topic("warn", lambda e: seen["registering"].append(str(e)))
        other.subscribe_topic("warn", lambda e: seen["submitting"].append(str(e)))
        bag = db.from_sequence(range(20), npartitions=10).map_partitions(
            lambda part: [dc.get_context("A")["name"] for _ in part]
        )
        await other.gather(other.compute(bag))
        await async_poll_for(lambda: seen["submitting"], timeout=10)
    assert seen["registering"] == []


# ---------------------------------------------------------------- 3. scale-in
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 4, config={"dask-context.adaptive.keep-warm": "1h"})
async def test_scale_in_keeps_groups_whole_and_never_drops_busy_workers(c, s, *workers):
    groups = {w.address: "ab"[i // 2] for i, w in enumerate(workers)}  # two 2-worker jobs
    await dc.register(c, spec("A"))
    # nothing warm: Dask's own choice, untouched
    assert set(s.workers_to_close(key=lambda ws: groups[ws.address])) == set(groups)
    with dc.use("A"):
        await c.submit(where, 1, name="A", key="warm-up", workers=[workers[0].address], allow_other_workers=True)
    await dc.register(c, spec("A"))
    with dc.use("A"):
        await c.gather(c.map(where, range(3), name="A"))
    warm = set((await report(c))["contexts"]["A"]["warm"])
    assert len(warm) == 1
    warm_group = groups[next(iter(warm))]
    # through ContextAdaptive's handler, the key= groups are known: the warm
    # worker's whole group stays, the other group may go
    from distributed.protocol import pickle

    closable = await c.scheduler.dask_context_workers_to_close(
        key=pickle.dumps(lambda ws, g=groups: g[ws.address]), attribute="address")
    assert closable and not {groups[a] for a in closable} & {warm_group}
    assert {a for a in groups if groups[a] != warm_group} == set(closable)
    # a busy worker with nothing warm is not held back by the router: n= may close it
    ev = Event()
    cold = next(w for w in workers if w.address not in warm)
    busy = c.submit(lambda ev: ev.wait(), ev, workers=[cold.address])
    await async_poll_for(lambda: s.workers[cold.address].processing, timeout=5)
    assert cold.address in s.workers_to_close(n=3)
    await ev.set()
    await busy


# ---------------------------------------------------------------- registration by several clients
@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_two_clients_registering_the_same_spec_at_once(c, s, a, b):
    from distributed import Client

    async with Client(s.address, asynchronous=True) as c2:
        statuses = await asyncio.gather(dc.register(c, spec("A", seconds=0.2)),
                                        dc.register(c2, spec("A", seconds=0.2)))
        assert sorted(st["A"] for st in statuses) == ["added", "unchanged"]
        with dc.use("A"):
            assert len(await c2.gather(c2.map(where, range(6), name="A"))) == 6
        loads = (await report(c))["contexts"]["A"]["loads"]
        # a later run of the same script registers again: nothing reloads
        assert await dc.register(c2, spec("A", seconds=0.2)) == {"A": "unchanged"}
        with dc.use("A"):
            await c.gather(c.map(where, range(6, 12), name="A"))
        assert (await report(c))["contexts"]["A"]["loads"] == loads
        assert len([p for p in s.worker_plugins if p == "dask-context-A"]) == 1
