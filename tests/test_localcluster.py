"""End to end on real LocalClusters with process workers and a real transformers model."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import dask
import dask.bag as db
import pytest
from distributed import Client, LocalCluster, wait

import dask_context as dc
from dask_context.factcheck import make_claims, verify
from dask_context.models import load_causal_lm, make_model
from tests.loaders import blob, use_context, verify_slowly


def loads_per_worker(client, name):
    events = client.get_events("dask-context")
    return Counter(e["worker"] for _, e in events if e["action"] == "loaded" and e["context"] == name)


def test_one_load_per_worker_for_many_tasks(client, model_dir):
    dc.register(client, dc.ContextSpec("verifier", load_causal_lm, args=[str(model_dir)]))
    claims = make_claims(300)
    with dc.use("verifier"):
        verdicts = db.from_sequence(claims, partition_size=2).map_partitions(verify).compute()
    assert [v["claim"] for v in verdicts] == claims
    per_worker = loads_per_worker(client, "verifier")
    assert set(per_worker.values()) == {1}
    info = dc.report(client)["contexts"]["verifier"]
    assert info["tasks"] >= 150 and info["loads"] == len(per_worker) <= 2

    # a second computation reuses the warm model
    with dc.use("verifier"):
        db.from_sequence(claims[:20], partition_size=2).map_partitions(verify).compute()
    assert loads_per_worker(client, "verifier") == per_worker


def run_three_models(client, paths, memory=None):
    """3 models x 30 batches of 2 claims, all submitted at once; return the report."""
    specs = [
        dc.ContextSpec(f"m{i}", load_causal_lm, args=[str(p)], memory=memory)
        for i, p in enumerate(paths)
    ]
    dc.register(client, *specs)
    futures = []
    for i in range(3):
        with dc.use(f"m{i}"):
            batches = [make_claims(2, seed=j) for j in range(30)]
            futures += client.map(verify, batches, context=f"m{i}", key=[f"m{i}-{j}" for j in range(30)])
    assert len(client.gather(futures)) == 90
    return dc.report(client)


def test_several_models_with_a_budget_of_one_per_worker(tmp_path):
    paths = [make_model(tmp_path / f"m{i}", preset="tiny", seed=i) for i in range(3)]
    nbytes = 431_936  # the tiny model's weights
    with dask.config.set({"dask-context.worker.memory-budget": int(1.5 * nbytes)}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        # no size declared: unknown sizes count as a whole worker until measured
        r = run_three_models(client, paths)
        loads = sum(c["loads"] for c in r["contexts"].values())
        assert loads == 3, r  # one per model: the minimum
        assert [c["tasks"] for c in r["contexts"].values()] == [30, 30, 30]
        for w in r["workers"].values():
            assert len(w["resident"]) <= 1 and w["budget"] == int(1.5 * nbytes)


def test_killed_worker_loses_no_result(client, model_dir):
    dc.register(client, dc.ContextSpec("verifier", load_causal_lm, args=[str(model_dir)]))
    claims = make_claims(400)
    batches = [claims[i : i + 2] for i in range(0, 400, 2)]
    with dc.use("verifier"):
        futures = client.map(verify_slowly, batches, seconds=0.02,
                             key=[f"verify-{i}" for i in range(len(batches))])
    # kill a warm worker while most of the work is still to do: whatever the
    # machine's speed, it has tasks in flight (every task takes 20 ms or more)
    deadline = time.monotonic() + 120
    while sum(f.done() for f in futures) < 20:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    victim = dc.report(client)["contexts"]["verifier"]["warm"][0]
    os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    wait(futures, timeout=180)
    results = [v for batch in client.gather(futures) for v in batch]
    assert [v["claim"] for v in results] == claims  # each result once, in order
    assert victim not in client.scheduler_info()["workers"]
    info = dc.report(client)["contexts"]["verifier"]
    assert info["requeued"] >= 1 and info["tasks"] >= len(batches)


def test_a_restarted_or_added_worker_keeps_the_budget_the_cluster_was_given():
    with dask.config.set({"dask-context.worker.memory-budget": "60MB"}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        dc.register(client, dc.ContextSpec("A", blob, args=["A"]))
        before = dc.report(client)["workers"]
        assert {w["budget"] for w in before.values()} == {60e6}
        victim = sorted(before)[0]
        os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
        # the nanny restarts it: a new process, a new address, default settings
        def budgets(n):
            deadline = time.monotonic() + 60
            while True:  # until n workers have set the context up
                workers = dc.report(client)["workers"]
                if victim not in workers and sum(w["budget"] is not None for w in workers.values()) == n:
                    return {w["budget"] for w in workers.values()}
                assert time.monotonic() < deadline, workers
                time.sleep(0.1)

        assert budgets(2) == {60e6}
        cluster.scale(3)  # and a worker the cluster adds later
        assert budgets(3) == {60e6}
        with dc.use("A"):
            assert len(client.gather(client.map(use_context, range(10), name="A"))) == 10


def test_bad_inputs_give_clear_errors(client):
    spec = dc.ContextSpec("small", dict, kwargs={"x": 1})
    assert dc.register(client, spec) == {"small": "added"}
    assert dc.register(client, spec) == {"small": "unchanged"}
    with pytest.raises(dc.DuplicateContextError, match="context 'small' is already registered with a different kwargs"):
        dc.register(client, dc.ContextSpec("small", dict, kwargs={"x": 2}))
    with pytest.raises(dc.DuplicateContextError, match="'a' is given twice"):
        dc.register(client, dc.ContextSpec("a", dict), dc.ContextSpec("a", dict))
    with pytest.raises(TypeError, match="loader of context 'x' is not callable"):
        dc.ContextSpec("x", "not-callable")

    with dc.use("missing"):
        future = client.submit(use_context, 1, "missing")
    with pytest.raises(dc.UnknownContextError, match="unknown context 'missing'"):
        future.result()

    # a declared size is an estimate: a context declared larger than the budget is
    # still tried, and what it measures is what counts
    dc.register(client, dc.ContextSpec("huge", dict, kwargs={"name": "huge"}, memory="10 TiB"))
    with dc.use("huge"):
        assert client.submit(use_context, 1, "huge").result()[:2] == ("huge", 1)
    assert dc.report(client)["contexts"]["huge"]["nbytes"] < 10_000
    # the workers are still fine
    with dc.use("small"):
        assert client.submit(lambda: dc.get_context("small")).result() == {"x": 1}
