"""ContextAdaptive on a LocalCluster (the SLURM version is in test_slurm.py)."""

import asyncio

import dask
from distributed import Client, LocalCluster
from distributed.utils_test import async_poll_for, gen_test

import dask_context as dc
from tests.loaders import blob, where

ADAPT = dict(Adaptive=dc.ContextAdaptive, interval="100ms", wait_count=2, target_duration="1s")


def local_cluster(n_workers):
    return LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=False, asynchronous=True,
        dashboard_address=":0",
    )


@gen_test(timeout=120)
async def test_scales_out_on_context_work_and_back_to_zero():
    with dask.config.set({"dask-context.adaptive.keep-warm": "1s"}):
        async with local_cluster(0) as cluster, Client(cluster, asynchronous=True) as client:
            cluster.adapt(minimum=0, maximum=3, startup_time="0.5s", **ADAPT)
            await dc.register(client, dc.ContextSpec("A", blob, args=["A"], kwargs={"seconds": 0.3}))
            with dc.use("A"):
                futures = client.map(where, range(200), name="A", seconds=0.02)
            # 200 tasks of unknown duration (0.5 s each) are worth all 3 workers
            await async_poll_for(lambda: len(cluster.scheduler.workers) == 3, timeout=30)
            results = await client.gather(futures)
            assert sorted(x for x, _ in results) == list(range(200))
            # results the client still holds keep a worker past keep-warm (twenty
            # adapt rounds): the others retire gracefully, handing their results over,
            # and nothing is recomputed
            await asyncio.sleep(2.0)
            assert len(cluster.scheduler.workers) >= 1
            assert all(f.status == "finished" for f in futures)
            r = await client.scheduler.dask_context_report()
            assert r["contexts"]["A"]["tasks"] == 200
            # ...and once released, the cluster scales to zero
            del futures
            await async_poll_for(lambda: not cluster.scheduler.workers, timeout=30)


@gen_test(timeout=120)
async def test_short_work_does_not_scale_out_past_what_pays_off():
    async with local_cluster(0) as cluster, Client(cluster, asynchronous=True) as client:
        # a new worker is said to need 60 s to start: 4 short tasks never justify a second
        adapt = cluster.adapt(minimum=0, maximum=3, startup_time="60s", **ADAPT)
        await dc.register(client, dc.ContextSpec("A", blob, args=["A"]))
        with dc.use("A"):
            futures = client.map(where, range(4), name="A")
        results = await client.gather(futures)
        assert len({addr for _, addr in results}) == 1
        ups = [rec["n"] for _, rec in adapt.log if rec.get("status") == "up"]
        assert ups == [1], adapt.log


@gen_test(timeout=120)
async def test_scale_in_retires_cold_workers_and_keeps_warm_ones():
    with dask.config.set({"dask-context.adaptive.keep-warm": "1h"}):
        async with local_cluster(3) as cluster, Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(3)
            await dc.register(client, dc.ContextSpec("A", blob, args=["A"], kwargs={"seconds": 0.5}))
            with dc.use("A"):
                await client.gather(client.map(where, range(5), name="A"))
            warm = (await client.scheduler.dask_context_report())["contexts"]["A"]["warm"]
            assert len(warm) == 1
            cluster.adapt(minimum=0, maximum=3, **ADAPT)
            await async_poll_for(lambda: len(cluster.scheduler.workers) == 1, timeout=30)
            assert list(cluster.scheduler.workers) == list(warm)
            # ten more adapt rounds: the warm worker is still kept (keep-warm is 1 h)
            await asyncio.sleep(1.0)
            assert list(cluster.scheduler.workers) == list(warm)
