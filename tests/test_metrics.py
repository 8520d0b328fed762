"""Prometheus metrics on the scheduler's /metrics, scraped after short runs."""

from __future__ import annotations

from collections import defaultdict

from distributed.utils_test import async_poll_for, gen_cluster
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

import dask_context as dc
from dask_context import ContextSpec
from tests.loaders import blob, where

ONE = [("127.0.0.1", 1)]


def spec(name: str, seconds: float = 0.0, **kwargs) -> ContextSpec:
    return ContextSpec(name, blob, args=[name], kwargs={"seconds": seconds, "nbytes": 500}, **kwargs)


async def scrape(s) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label items: value}}`` of the dask_context_* samples."""
    response = await AsyncHTTPClient().fetch(f"http://localhost:{s.http_server.port}/metrics")
    samples: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            if sample.name.startswith("dask_context_"):
                samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def le(context: str, bound: str) -> tuple:
    return (("context", context), ("le", bound))


async def run(c, name: str, n: int) -> None:
    with dc.use(name):
        await c.gather(c.map(where, range(n), name=name, key=[f"{name}-{i}" for i in range(n)]))


@gen_cluster(client=True, nthreads=ONE, clean_kwargs={"threads": False},
             config={"dask-context.worker.memory-budget": 1000})
async def test_load_and_unload_latency_histograms_hits_and_resident_contexts(c, s, a):
    # one worker fits one context: A loads, B's load evicts A, then B is warm
    await dc.register(c, spec("A", seconds=0.3, memory=600), spec("B", memory=600))
    await run(c, "A", 4)
    await run(c, "B", 5)
    m = await scrape(s)
    r = await c.scheduler.dask_context_report()

    assert m["dask_context_loads_total"] == {(("context", "A"),): 1.0, (("context", "B"),): 1.0}
    assert m["dask_context_tasks_total"][(("context", "A"),)] == 4
    # hits are counted as tasks finish, not derived: workers load a context before
    # they get its tasks, so every routed task finds it warm
    assert m["dask_context_hits_total"] == {(("context", "A"),): 4.0, (("context", "B"),): 5.0}

    # load latency: Prometheus histogram, cumulative, _count = loads, _sum = seconds
    seconds = r["contexts"]["A"]["load_seconds"]
    assert seconds >= 0.3
    assert m["dask_context_load_latency_seconds_sum"][(("context", "A"),)] == seconds
    assert m["dask_context_load_seconds_total"][(("context", "A"),)] == seconds
    assert m["dask_context_load_latency_seconds_count"][(("context", "A"),)] == 1
    buckets = {
        dict(labels)["le"]: v
        for labels, v in m["dask_context_load_latency_seconds_bucket"].items()
        if dict(labels)["context"] == "A"
    }
    assert buckets["0.25"] == 0 and buckets["+Inf"] == 1
    assert all(v == (float(b) >= seconds) for b, v in buckets.items()), buckets

    # A was unloaded once to make room for B
    assert m["dask_context_evictions_total"] == {(("context", "A"),): 1.0, (("context", "B"),): 0.0}
    assert m["dask_context_unload_latency_seconds_count"][(("context", "A"),)] == 1
    assert m["dask_context_unload_latency_seconds_bucket"][le("A", "+Inf")] == 1
    assert m["dask_context_unload_latency_seconds_count"][(("context", "B"),)] == 0

    worker = (("worker", a.address),)
    assert m["dask_context_resident_contexts"] == {worker: 1.0}
    nbytes = r["workers"][a.address]["resident"]["B"]
    assert m["dask_context_resident_bytes"] == {(("context", "B"), ("worker", a.address)): nbytes}
    assert m["dask_context_budget_bytes"] == {worker: 1000.0}
    assert m["dask_context_worker_running_tasks"] == {worker: 0.0}
    assert m["dask_context_queued_tasks"][(("context", "B"),)] == 0
    assert m["dask_context_running_tasks"][(("context", "B"),)] == 0
    assert m["dask_context_warm_workers"] == {(("context", "A"),): 0.0, (("context", "B"),): 1.0}


@gen_cluster(client=True, nthreads=ONE * 2, clean_kwargs={"threads": False})
async def test_worker_series_leave_with_their_worker(c, s, a, b):
    await dc.register(c, spec("A", eager=True))
    router = s.plugins["dask-context"]
    # eager: both workers load A as soon as its plugin is set up
    await async_poll_for(lambda: len(router.report()["contexts"]["A"]["warm"]) == 2, timeout=5)
    m = await scrape(s)
    assert set(m["dask_context_resident_contexts"]) == {(("worker", a.address),), (("worker", b.address),)}
    assert m["dask_context_warm_workers"][(("context", "A"),)] == 2

    await b.close()
    m = await scrape(s)
    assert set(m["dask_context_resident_contexts"]) == {(("worker", a.address),)}
    assert all(dict(labels)["worker"] == a.address for labels in m["dask_context_resident_bytes"])
    assert m["dask_context_warm_workers"][(("context", "A"),)] == 1


@gen_cluster(client=True, nthreads=ONE, clean_kwargs={"threads": False})
async def test_every_documented_metric_is_served(c, s, a):
    from pathlib import Path

    await dc.register(c, spec("A"))
    await run(c, "A", 2)
    served = {name.removesuffix("_bucket") for name in await scrape(s)}
    documented = Path(__file__).parents[1].joinpath("docs", "metrics.md").read_text()
    for name in served:
        base = name.removesuffix("_sum").removesuffix("_count")
        assert f"`{base}" in documented, f"{base} is served but not in docs/metrics.md"


def test_a_router_started_by_a_preload_registers_its_metrics_once(tmp_path):
    """``dask scheduler --preload dask_context`` starts its router twice (the preload,
    then the scheduler's start): one router logs no 'already registered', and its
    metrics are served."""
    import socket
    import subprocess
    import sys
    import urllib.request

    from distributed import Client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "scheduler.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", str(port), "--dashboard-address", "127.0.0.1:0", "--preload", "dask_context"],
            stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            with Client(f"tcp://127.0.0.1:{port}", timeout=30) as client:
                assert dc.register(client, ContextSpec("t", dict)) == {"t": "added"}
                http = client.scheduler_info()["services"]["dashboard"]
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=10) as page:
                    metrics = page.read().decode()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    text = log.read_text()
    assert "Run preload setup: dask_context" in text, text
    assert "already registered" not in text, text
    assert 'dask_context_loads_total{context="t"} 0.0' in metrics
