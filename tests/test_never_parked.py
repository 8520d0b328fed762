"""Nothing parked forever: the everyday actions that once left context tasks waiting
with no error (issue 16), on real process workers.

- a loader with type hints defined in the user's own script (``__main__``);
- ``client.restart()`` and then more work;
- context tasks submitted from a task that left its thread to wait for them
  (``worker_client``, ``secede``);
- a context's worker plugin unregistered with Dask's own call; a context named like
  one of dask-context's plugins; a loader that uses another context;
- ``register(..., replace=True)`` after a load, twenty times, quiet and under CPU load;
- a loader that kills its worker process, on every worker or on one, or outgrows its
  worker's memory limit (the nanny restarts it); restarts during loads, which are no
  deaths;
- the stall guard, tested by corrupting the router's records on purpose.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import subprocess
import sys
import textwrap
import time

import dask
import pytest
from distributed import Client, LocalCluster, wait

import dask_context
from dask_context import ContextSpec
from tests.loaders import (
    blob,
    built_on,
    fan_out,
    kills_its_worker,
    outgrows_its_worker,
    use_context,
)


def _cluster(n: int = 2) -> LocalCluster:
    return LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
        worker_dashboard_address=None,
    )


def _count_tasks(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


def _busy() -> None:
    while True:
        pass


@pytest.fixture(params=["quiet", "busy"])
def cpu_load(request):
    """Nothing, or two busy loops on the machine's cores while the test runs."""
    hogs = []
    if request.param == "busy":
        hogs = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(2)]
        for p in hogs:
            p.start()
    yield request.param
    for p in hogs:
        p.kill()
        p.join()


SCRIPT = textwrap.dedent(
    """
    import time
    from distributed import Client, LocalCluster
    import dask_context

    def load(version: str, seconds: float = 0.0) -> dict:
        time.sleep(seconds)
        return {"version": version}

    def task(x: int) -> str:
        return dask_context.get_context("hinted")["version"] + str(x)

    if __name__ == "__main__":
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            dask_context.register(client, dask_context.ContextSpec("hinted", load, args=["v"]))
            with dask_context.use("hinted"):
                futures = client.map(task, range(3))
            print("RESULT", client.gather(futures))
            print("LOADS", dask_context.report(client)["contexts"]["hinted"]["loads"])
    """
)


def test_a_type_hinted_loader_defined_in_the_users_script_runs(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT ['v0', 'v1', 'v2']" in out.stdout
    assert "LOADS 1" in out.stdout


def test_the_spec_identity_travels_with_the_spec():
    """The token is computed where the spec is made and never recomputed from bytes."""
    import cloudpickle

    def load(version: str, seconds: float = 0.0) -> dict:
        return {}

    spec = ContextSpec("hinted", load, args=["v"])
    copy = cloudpickle.loads(cloudpickle.dumps(spec))
    assert (copy.token, copy.fields) == (spec.token, spec.fields)
    # a different spec under the same name still differs
    assert ContextSpec("hinted", load, args=["w"]).token != spec.token


def test_context_tasks_run_after_client_restart():
    with _cluster() as cluster, Client(cluster) as client:
        dask_context.register(client, ContextSpec("r", blob, args=["r"]))
        with dask_context.use("r"):
            assert len(client.gather(client.map(use_context, range(4), name="r"))) == 4
        client.restart()
        with dask_context.use("r"):
            futures = client.map(use_context, range(10, 20), name="r")
        wait(futures, timeout=60)
        assert [f.result()[1] for f in futures] == list(range(10, 20))
        report = dask_context.report(client)
        assert set(report["workers"]) == set(client.scheduler_info()["workers"])
        # the router knows again what each worker can load
        assert report["contexts"]["r"]["allowed"]


@pytest.mark.parametrize("saturation", [1.1, float("inf")])
@pytest.mark.parametrize("how", ["worker_client", "secede"])
def test_tasks_submitted_from_a_seceded_task_run_on_its_thread(how, saturation):
    # one worker of one thread, busy with tasks that wait on context tasks they
    # submitted: those run only on the thread their parent left
    with dask.config.set({"distributed.scheduler.worker-saturation": saturation}), \
            _cluster(1) as cluster, Client(cluster) as client:
        dask_context.register(client, ContextSpec("s", blob, args=["s"]))
        with dask_context.use("s"):
            futures = client.map(fan_out, [0, 10, 20], name="s", how=how)
        wait(futures, timeout=60)
        assert [f.result() for f in futures] == [[0, 1], [10, 11], [20, 21]]
        assert dask_context.report(client)["contexts"]["s"]["loads"] == 1


def test_a_context_whose_worker_plugin_is_unregistered_by_hand_fails_its_tasks_at_once():
    # client.unregister_worker_plugin, Dask's own call, instead of dask_context.unregister
    with _cluster(1) as cluster, Client(cluster) as client:
        dask_context.register(client, ContextSpec("h", blob, args=["h"], kwargs={"seconds": 0.5}))
        with dask_context.use("h"):
            futures = client.map(use_context, range(30), name="h", seconds=0.1)
        client.gather(futures[:1])
        client.unregister_worker_plugin("dask-context-h")
        wait(futures, timeout=15)
        failed = [f for f in futures if f.status == "error"]
        assert failed and all(f.status in ("finished", "error") for f in futures)
        assert all(isinstance(f.exception(), dask_context.UnknownContextError) for f in failed)
        assert "h" not in dask_context.report(client)["contexts"]


def test_a_context_named_like_a_plugin_of_dask_context_runs():
    # a context's worker plugin is dask-context-<name>: no name takes another's place
    with _cluster(1) as cluster, Client(cluster) as client:
        dask_context.register(client, ContextSpec("preemption", blob, args=["p"]))
        with dask_context.use("preemption"):
            futures = client.map(use_context, range(3), name="preemption")
        wait(futures, timeout=30)
        assert [f.result()[1] for f in futures] == [0, 1, 2]


def test_a_loader_that_uses_another_context_loads_it_on_its_worker():
    # a model's loader asks for its tokenizer's context (get_context in the loader)
    with _cluster() as cluster, Client(cluster) as client:
        dask_context.register(
            client, ContextSpec("tok", blob, args=["tok"]),
            ContextSpec("model", built_on, args=["model", "tok"]),
        )
        with dask_context.use("model"):
            futures = client.map(use_context, range(20), name="model", seconds=0.05)
        wait(futures, timeout=30)
        assert [f.result()[1] for f in futures] == list(range(20))
        contexts = dask_context.report(client)["contexts"]
        # the tokenizer loads where the model does, as part of its load
        assert contexts["model"]["loads"] == contexts["tok"]["loads"] in (1, 2)


def test_a_loader_that_kills_every_worker_fails_its_tasks_with_a_clear_error():
    # the nanny restarts each worker it kills; Dask counts no task against the
    # deaths, as loads run before any task is sent
    with _cluster() as cluster, Client(cluster) as client:
        dask_context.register(client, ContextSpec("crash", kills_its_worker))
        with dask_context.use("crash"):
            futures = client.map(use_context, range(4), name="crash")
        wait(futures, timeout=120)
        for f in futures:
            with pytest.raises(dask_context.WorkerDiedLoadingError, match="died while loading context 'crash'"):
                f.result()
        deaths = dask_context.report(client)["contexts"]["crash"]["deaths"]
        # load-deaths (10), and at most the other worker's load in flight then
        assert 10 <= deaths <= 11


def test_a_loader_that_kills_one_worker_leaves_the_tasks_to_the_other():
    with _cluster() as cluster, Client(cluster) as client:
        dask_context.register(client, ContextSpec("crash", kills_its_worker, kwargs={"on": [0]}))
        with dask_context.use("crash"):
            futures = client.map(use_context, range(20), name="crash", seconds=0.05)
        wait(futures, timeout=120)
        assert sorted(f.result()[1] for f in futures) == list(range(20))


def test_a_loader_that_kills_the_workers_left_fails_its_tasks_once_its_holder_left():
    # it loaded on worker 1 and kills worker 0; once worker 1 is gone, the deaths
    # since that load count, where the nanny would restart worker 0 forever
    with dask.config.set({"dask-context.scheduler.load-deaths": 3}), _cluster() as cluster, \
            Client(cluster) as client:
        dask_context.register(client, ContextSpec("crash", kills_its_worker, kwargs={"on": [0]}))
        with dask_context.use("crash"):
            first = client.map(use_context, range(6), name="crash", seconds=0.05)
        assert sorted(r[1] for r in client.gather(first)) == list(range(6))
        holders = [a for a, w in dask_context.report(client)["workers"].items() if "crash" in w["resident"]]
        assert len(holders) == 1
        # no results to move off it (the other worker may be dead): it retires at once
        del first
        deadline = time.monotonic() + 30
        while client.run_on_scheduler(_count_tasks):
            assert time.monotonic() < deadline, "the results were not released"
            time.sleep(0.05)
        client.retire_workers(holders, close_workers=True)
        while holders[0] in client.scheduler_info()["workers"]:
            assert time.monotonic() < deadline, "the holder was not retired"
            time.sleep(0.05)
        with dask_context.use("crash"):
            futures = client.map(use_context, range(6, 10), name="crash")
        wait(futures, timeout=120)
        for f in futures:
            with pytest.raises(dask_context.WorkerDiedLoadingError, match="since it last loaded"):
                f.result()
        assert dask_context.report(client)["contexts"]["crash"]["deaths"] >= 3


def test_a_loader_that_outgrows_the_memory_limit_fails_its_tasks():
    # the nanny terminates the worker (SIGTERM): it must die (and come back), not
    # drain and leave for good
    with dask.config.set({"dask-context.scheduler.load-deaths": 2}), LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, memory_limit="400 MiB",
        dashboard_address=None, worker_dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        dask_context.register(client, ContextSpec("huge", outgrows_its_worker))
        with dask_context.use("huge"):
            future = client.submit(use_context, 1, name="huge")
        wait(future, timeout=180)
        with pytest.raises(dask_context.WorkerDiedLoadingError, match="'huge'"):
            future.result()


def test_restarts_during_loads_are_no_deaths():
    with _cluster() as cluster, Client(cluster) as client:
        dask_context.register(client, ContextSpec("slow", blob, args=["slow"], kwargs={"seconds": 3.0}))
        for _ in range(4):  # restarts in a row, mid-load
            with dask_context.use("slow"):
                futures = client.map(use_context, range(4), name="slow")
            deadline = time.monotonic() + 30
            while not any(w["loading"] for w in dask_context.report(client)["workers"].values()):
                assert time.monotonic() < deadline, "no load started"
                time.sleep(0.05)
            client.restart()
        with dask_context.use("slow"):
            futures = client.map(use_context, range(4), name="slow")
        assert [r[1] for r in client.gather(futures)] == list(range(4))
        assert dask_context.report(client)["contexts"]["slow"]["deaths"] == 0


def test_replace_after_a_load_never_strands_tasks(cpu_load):
    done = 0
    with _cluster(1) as cluster, Client(cluster) as client:
        for i in range(20):
            spec = ContextSpec("m", blob, args=[f"v{i}"], kwargs={"seconds": 0.2})
            dask_context.register(client, spec, replace=True)
            with dask_context.use("m"):
                futures = client.map(use_context, range(3), name="m")
            wait(futures, timeout=60)
            assert {f.result()[0] for f in futures} == {f"v{i}"}
            del futures
            done += 1
        loads = dask_context.report(client)["contexts"]["m"]["loads"]
    assert done == 20
    # the replaced record counts the loads of the current spec: one, on the one worker
    assert loads == 1


def _corrupt(dask_scheduler, how: str) -> None:
    router = dask_scheduler.plugins["dask-context"]
    for w in router.state.workers.values():
        w.specs.clear()
        w.resident.clear()
        # and no snapshot of the worker's own is taken as newer than these records
        w.seq = 10**9
    for ctx in router.state.contexts.values():
        ctx.allowed.clear()
        if how == "token":
            # a record the workers' snapshots cannot repair
            ctx.token = "corrupt"


@pytest.mark.parametrize("how", ["workers", "token"])
def test_the_stall_guard_unsticks_tasks_when_the_router_records_are_corrupt(how, caplog):
    settings = {
        "dask-context.scheduler.stall-margin": "1s",
        "dask-context.scheduler.reconcile-interval": "1h",
        "dask-context.scheduler.default-load-time": "0.5s",
    }
    with dask.config.set(settings), _cluster() as cluster, Client(cluster) as client:
        dask_context.register(client, ContextSpec("g", blob, args=["g"]))
        with dask_context.use("g"):
            client.gather(client.map(use_context, range(2), name="g"))
        client.run_on_scheduler(_corrupt, how=how)
        caplog.set_level(logging.ERROR, logger="dask_context.scheduler")
        start = time.monotonic()
        with dask_context.use("g"):
            futures = client.map(use_context, range(100, 106), name="g")
        wait(futures, timeout=60)
        assert sorted(f.result()[1] for f in futures) == list(range(100, 106))
        assert time.monotonic() - start < 30
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("waited" in m and "'g'" in m for m in errors), errors
        if how == "token":
            assert any("handing them back" in m for m in errors), errors


def test_estimates_ten_times_too_small_load_one_at_a_time_within_budget(tmp_path):
    """Two contexts declared at a tenth of their size, a budget that fits one: the
    worker loads them one at a time, and the second load makes room for itself."""
    from tests.loaders import logged_blob

    log = tmp_path / "loads.log"
    size = 40_000_000
    specs = [
        ContextSpec(n, logged_blob, args=[n, str(log)],
                    kwargs={"nbytes": size, "seconds": 0.5}, memory=size // 10)
        for n in ("a", "b")
    ]
    with dask.config.set({"dask-context.worker.memory-budget": int(size * 1.5)}), \
            _cluster(1) as cluster, Client(cluster) as client:
        dask_context.register(client, *specs)
        futures = []
        for n in ("a", "b"):
            with dask_context.use(n):
                futures += client.map(use_context, range(10), name=n, seconds=0.01)
        wait(futures, timeout=120)
        assert all(f.status == "finished" for f in futures)
        report = dask_context.report(client)
    spans = sorted((float(s), float(e)) for _, s, e in (line.split() for line in log.read_text().splitlines()))
    assert all(s2 >= e1 for (_, e1), (s2, _) in itertools.pairwise(spans)), spans
    (worker,) = report["workers"].values()
    assert sum(worker["resident"].values()) <= int(size * 1.5)
    assert sum(c["failures"] for c in report["contexts"].values()) == 0


def test_a_new_context_of_unknown_size_evicts_nothing_where_there_is_room():
    from tests.loaders import broken

    with _cluster(1) as cluster, Client(cluster) as client:
        dask_context.register(
            client,
            ContextSpec("warm", blob, args=["warm"], memory=1000),
            ContextSpec("new", blob, args=["new"]),
            ContextSpec("bad", broken),
        )
        with dask_context.use("warm"):
            client.gather(client.map(use_context, range(3), name="warm"))
        with dask_context.use("new"):
            client.gather(client.map(use_context, range(3), name="new"))
        with dask_context.use("bad"):
            failed = client.map(use_context, range(3), name="bad")
        wait(failed, timeout=60)
        assert all(f.status == "error" for f in failed)
        report = dask_context.report(client)
    assert report["contexts"]["warm"]["evictions"] == 0
    assert report["contexts"]["new"]["evictions"] == 0
    (worker,) = report["workers"].values()
    assert set(worker["resident"]) == {"warm", "new"}
