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
from tests.loaders import use_context


@pytest.fixture
def client():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        yield client


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


def test_several_models_with_a_budget_of_one_per_worker(tmp_path, model_dir):
    paths = [make_model(tmp_path / f"m{i}", preset="tiny", seed=i) for i in range(3)]
    nbytes = 2_000_000  # the tiny model is ~1.4 MB of weights
    with dask.config.set({"dask-context.worker.memory-budget": int(1.5 * nbytes)}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with cluster, Client(cluster) as client:
        specs = [
            dc.ContextSpec(f"m{i}", load_causal_lm, args=[str(p)], memory=nbytes, load_time=60)
            for i, p in enumerate(paths)
        ]
        dc.register(client, *specs)
        futures = []
        for i in range(3):
            with dc.use(f"m{i}"):
                batches = [make_claims(2, seed=j) for j in range(40)]
                futures += client.map(verify, batches, context=f"m{i}", key=[f"m{i}-{j}" for j in range(40)])
        results = client.gather(futures)
        assert len(results) == 120
        r = dc.report(client)["contexts"]
        loads = sum(r[f"m{i}"]["loads"] for i in range(3))
        # the minimum is 3; 120 loads would be one per task
        assert 3 <= loads <= 4, r
        assert [info["tasks"] for info in r.values()] == [40, 40, 40]
        for w in dc.report(client)["workers"].values():
            assert len(w["resident"]) <= 1


def test_killed_worker_loses_no_result(client, model_dir):
    dc.register(client, dc.ContextSpec("verifier", load_causal_lm, args=[str(model_dir)]))
    claims = make_claims(400)
    batches = [claims[i : i + 2] for i in range(0, 400, 2)]
    with dc.use("verifier"):
        futures = client.map(verify, batches, key=[f"verify-{i}" for i in range(len(batches))])
    # wait until both workers hold the model and work is under way, then kill one
    deadline = time.monotonic() + 60
    while len(loads_per_worker(client, "verifier")) < 2 or sum(f.done() for f in futures) < 20:
        assert time.monotonic() < deadline, "workers never got warm"
        time.sleep(0.05)
    pids = client.run(os.getpid)
    victim = max(pids)
    os.kill(pids[victim], signal.SIGKILL)
    wait(futures, timeout=120)
    results = [v for batch in client.gather(futures) for v in batch]
    assert [v["claim"] for v in results] == claims  # each result once, in order
    assert victim not in client.scheduler_info()["workers"]
    info = dc.report(client)["contexts"]["verifier"]
    assert info["requeued"] >= 1 and info["tasks"] >= len(batches)


def test_bad_inputs_give_clear_errors(client):
    spec = dc.ContextSpec("small", dict, kwargs={"x": 1})
    dc.register(client, spec)
    with pytest.raises(dc.DuplicateContextError, match="context 'small' is already registered"):
        dc.register(client, spec)
    with pytest.raises(dc.DuplicateContextError, match="'a' is given twice"):
        dc.register(client, dc.ContextSpec("a", dict), dc.ContextSpec("a", dict))
    with pytest.raises(TypeError, match="loader of context 'x' is not callable"):
        dc.ContextSpec("x", "not-callable")

    with dc.use("missing"):
        future = client.submit(use_context, 1, "missing")
    with pytest.raises(dc.UnknownContextError, match="unknown context 'missing'"):
        future.result()

    dc.register(client, dc.ContextSpec("huge", dict, memory="10 TiB"))
    with dc.use("huge"):
        future = client.submit(use_context, 1, "huge")
    with pytest.raises(dc.ContextTooLargeError, match=r"context 'huge' needs 10\.00 TiB but the memory budget"):
        future.result()
    # the workers are still fine
    with dc.use("small"):
        assert client.submit(lambda: dc.get_context("small")).result() == {"x": 1}
