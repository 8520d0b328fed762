"""Unmarked tasks: the router learns their task groups from ``get_context`` calls.

A task that calls ``get_context(name)`` without a ``use()`` mark, on a worker where
``name`` is cold, is sent back to the router once (its call taught the router its
group) instead of loading there. Under a budget of one context per worker, three
unmarked collections then cost the 3 loads marked ones cost, not a load every few
tasks. Nothing is lost and nothing bounces for ever: a task goes back at most once
from a worker, never without a router, never where its context is warm, and never
when the router said it would not route it.
"""

from __future__ import annotations

from collections import Counter

import dask
import dask.bag as db
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from distributed.utils_test import gen_cluster

import dask_context as dc
from dask_context import ContextSpec
from dask_context.worker import send_back_unmarked
from tests.loaders import blob, where

TWO = [("127.0.0.1", 1)] * 2
BUDGET = {"dask-context.worker.memory-budget": 10_000}


def spec(name, nbytes=8000, seconds=0.2):
    return ContextSpec(name, blob, args=[name], kwargs={"seconds": seconds, "nbytes": nbytes})


def sent_back(dask_worker):
    """Keys this worker sent back to the router (plain, for the client)."""
    return [str(k) for k in dask_worker.extensions["dask-context"]._sent_back]


def sent_back_twice(dask_scheduler):
    """Keys the scheduler took back from a worker more than once."""
    counts = Counter(t[0] for t in dask_scheduler.transition_log if t[1:3] == ("processing", "released"))
    return [str(k) for k, n in counts.items() if n > 1]


def loads(report, names):
    return sum(report["contexts"][n]["loads"] for n in names)


# ---------------------------------------------------------------- never lost, never looping
def test_the_send_back_rule():
    # routed, known and cold, first time, one context: back to the router
    assert send_back_unmarked(True, True, False, False, set())
    assert not send_back_unmarked(True, False, False, False, set())  # unknown: get_context raises


@gen_cluster(client=True, nthreads=TWO)
async def test_without_a_router_unmarked_tasks_run_where_they_are(c, s, a, b):
    await c.register_plugin(dc.ContextPlugin(spec("A", nbytes=10)))
    assert "dask-context" not in s.plugins
    results = await c.gather(c.map(where, range(10), name="A"))
    assert [x for x, _ in results] == list(range(10))
    assert not any((await c.run(sent_back)).values())


@gen_cluster(client=True, nthreads=TWO)
async def test_an_unmarked_task_runs_where_its_context_is_warm(c, s, a, b):
    await dc.register(c, spec("A", nbytes=10, seconds=0.0))
    with dc.use("A"):
        await c.submit(where, 0, name="A", key="warm-up", workers=[a.address])
    # pinned, so that Dask cannot place it elsewhere: it runs on the warm worker
    assert await c.submit(where, 1, name="A", key="unmarked", workers=[a.address]) == (1, a.address)
    assert not any((await c.run(sent_back)).values())


@gen_cluster(client=True, nthreads=TWO)
async def test_pinned_unmarked_tasks_on_a_cold_worker_go_back_at_most_once(c, s, a, b):
    await dc.register(c, spec("A", nbytes=10, seconds=0.0))
    futures = c.map(where, range(6), name="A", key=[f"pinned-{i}" for i in range(6)], workers=[b.address])
    assert await c.gather(futures) == [(i, b.address) for i in range(6)]
    # those b had started or been sent before the router said it would not route them
    assert sent_back_twice(s) == []


@gen_cluster(client=True, nthreads=TWO, config=BUDGET)
async def test_a_group_asking_for_several_contexts_runs_unrouted(c, s, a, b):
    await dc.register(c, spec("A", nbytes=10, seconds=0.05), spec("B", nbytes=10, seconds=0.05))
    bag = db.from_sequence(range(40), npartitions=20).map_partitions(
        lambda part: [(dc.get_context("AB"[x % 2])["name"], x) for x in part]
    )
    assert sorted(await c.compute(bag)) == sorted(("AB"[x % 2], x) for x in range(40))
    assert sent_back_twice(s) == []
    # the first ones, before the router knew
    assert len([*a.extensions["dask-context"]._sent_back, *b.extensions["dask-context"]._sent_back]) <= 4


@gen_cluster(client=True, nthreads=TWO, config=BUDGET)
async def test_unmarked_tasks_of_a_learned_group_come_back_and_are_routed(c, s, a, b):
    # in-process workers, unmarked client.map: each group's first tasks go back
    await dc.register(c, *(spec(n) for n in "ABC"))
    futures = []
    for n in "ABC":
        futures += c.map(where, range(30), name=n, key=[f"{n}-{i}" for i in range(30)])
    results = await c.gather(futures)
    assert [x for x, _ in results] == [*range(30)] * 3
    r = await c.scheduler.dask_context_report()
    assert loads(r, "ABC") <= 4, r["contexts"]
    assert sum(r["contexts"][n]["tasks"] for n in "ABC") == 90
    assert sent_back_twice(s) == []


# ---------------------------------------------------------------- process workers
@pytest.fixture(scope="module")
def budget_cluster():
    """Two process workers, one thread each, a budget of one 8 kB context each."""
    with dask.config.set(BUDGET):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as lc, Client(lc) as client:
            yield client


def _check(client, names, results, expected):
    assert results == expected  # every task ran, once, with its own context
    report = dc.report(client)
    # the minimum is one load per context; unrouted, they thrash (8 loads for 90)
    assert loads(report, names) <= 4, report["contexts"]
    assert sum(report["contexts"][n]["tasks"] for n in names) == 90  # all routed
    assert client.run_on_scheduler(sent_back_twice) == []  # sent back at most once


def test_unmarked_bags_under_a_budget_load_each_context_about_once(budget_cluster):
    client = budget_cluster
    names = ["bag0", "bag1", "bag2"]
    dc.register(client, *(spec(n) for n in names))
    bags = [
        db.from_sequence(range(60), npartitions=30).map_partitions(
            lambda part, n=n: [(dc.get_context(n)["name"], x) for x in part]
        )
        for n in names
    ]
    results = dask.compute(*bags)
    _check(client, names, [list(r) for r in results], [[(n, x) for x in range(60)] for n in names])


def test_unmarked_delayed_under_a_budget_load_each_context_about_once(budget_cluster):
    client = budget_cluster
    names = ["delayed0", "delayed1", "delayed2"]
    dc.register(client, *(spec(n) for n in names))

    def judge(x, name):
        return dc.get_context(name)["name"], x

    tasks = [[dask.delayed(judge)(x, n, dask_key_name=(f"judge-{n}", x)) for x in range(30)] for n in names]
    results = dask.compute(*tasks)
    _check(client, names, [list(r) for r in results], [[(n, x) for x in range(30)] for n in names])


def test_unmarked_dataframes_under_a_budget_load_each_context_about_once(budget_cluster):
    import dask.dataframe as dd

    client = budget_cluster
    names = ["frame0", "frame1", "frame2"]
    dc.register(client, *(spec(n) for n in names))
    frame = dd.from_pandas(pd.DataFrame({"x": range(60)}), npartitions=30)

    def judge(part, name):
        return part.assign(model=dc.get_context(name)["name"])

    meta = pd.DataFrame({"x": pd.Series([], dtype="int64"), "model": pd.Series([], dtype=object)})
    frames = [frame.map_partitions(judge, n, meta=meta) for n in names]
    results = dask.compute(*frames)
    assert [list(r["model"].unique()) for r in results] == [[n] for n in names]
    assert all(sorted(r["x"]) == list(range(60)) for r in results)
    report = dc.report(client)
    assert loads(report, names) <= 4, report["contexts"]
    assert client.run_on_scheduler(sent_back_twice) == []
