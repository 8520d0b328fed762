import dask
import pytest
from distributed.utils_test import async_poll_for, gen_cluster

import dask_context as dc
from tests.loaders import blob, where


def test_use_validates_and_annotates():
    with pytest.raises(ValueError, match="non-empty string"):
        with dc.use(""):
            pass
    with dc.use("A"):
        assert dask.get_annotations() == {"context": "A"}
    assert dask.get_annotations() == {}


def test_delayed_decorator_keeps_the_function_and_marks_every_call():
    @dc.delayed("A", pure=True)
    def score(x):
        """Score x."""
        return x

    assert score.__name__ == "score" and score.__doc__ == "Score x."
    a, b = score(1), score(2)
    assert a.key != b.key
    for task in (a, b):
        assert task.dask.layers[task.key].annotations == {"context": "A"}
    assert dask.compute(a, b, scheduler="sync") == (1, 2)


def test_get_context_outside_a_worker():
    with pytest.raises(dc.NotRegisteredError, match="must run inside a task"):
        dc.get_context("A")


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_get_context_on_a_worker_without_dask_context(c, s, a):
    with pytest.raises(dc.NotRegisteredError, match="dask-context is not set up on worker"):
        await c.submit(where, 1, name="A")


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 2)
async def test_unregister_frees_the_context_everywhere(c, s, a, b):
    await dc.register(c, dc.ContextSpec("A", blob, args=["A"], eager=True))
    await async_poll_for(
        lambda: all("A" in w.extensions["dask-context"].cache.resident_bytes() for w in (a, b)), timeout=10
    )
    await dc.unregister(c, "A")
    for w in (a, b):
        cache = w.extensions["dask-context"].cache
        assert cache.names() == [] and cache.resident_bytes() == {}
    with dc.use("A"):
        with pytest.raises(dc.UnknownContextError, match="unknown context 'A'"):
            await c.submit(where, 1, name="A")


@gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
async def test_worker_plugins_without_the_router_work_unrouted(c, s, a):
    # only the worker side (no ContextRouter on the scheduler): contexts still load
    # once per worker and tasks still get them, they are just not routed
    await c.register_plugin(dc.ContextPlugin(dc.ContextSpec("A", blob, args=["A"])))
    with dc.use("A"):
        assert [x for x, _ in await c.gather(c.map(where, range(4), name="A"))] == [0, 1, 2, 3]
    assert a.extensions["dask-context"].cache.loads == {"A": 1}
    assert "dask-context" not in s.plugins
    with pytest.raises(dc.UnknownContextError, match="unknown context 'A'"):
        await dc.unregister(c, "A")
