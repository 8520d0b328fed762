"""Invalid settings stop a worker at start, with one message naming the setting."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import dask
import pytest
from distributed import Client, LocalCluster

import dask_context as dc
from dask_context import config
from dask_context.errors import SettingError

BAD = "5 parsecs"
KEY = "dask-context.worker.memory-budget"
# the environment variable Dask reads into KEY
ENV = "DASK_DASK_CONTEXT__WORKER__MEMORY_BUDGET"


@pytest.mark.parametrize(
    "key, value",
    [
        ("device", "gpu"),
        ("device", None),
        ("memory-budget", BAD),
        ("memory-budget", -1),
        ("memory-budget", True),
        ("memory-fraction", 0),
        ("memory-fraction", "most"),
        ("memory-fraction", None),
        ("host-memory-budget", "lots"),
        ("host-memory-budget", None),
        ("torch-threads", 0),
        ("torch-threads", 2.5),
        ("torch-threads", "four"),
        ("failed-load-retry", "5min"),
        ("failed-load-retry", [30]),
        ("failed-load-retry", None),
        ("node", ""),
        ("node", ["a"]),
        ("staging-dir", ""),
        ("staging-dir", 3),
    ],
)
def test_every_bad_worker_setting_is_named(key, value):
    with pytest.raises(SettingError, match=rf"^dask-context\.worker\.{key}: "):
        config.check_worker({**config.worker_settings(), key: value})


@pytest.mark.parametrize(
    "key, value",
    [
        ("device", "cuda:1"),
        ("memory-budget", None),
        ("memory-budget", "20 GiB"),
        ("memory-budget", 1e9),
        ("memory-fraction", "0.5"),
        ("host-memory-budget", 0),
        ("torch-threads", 4),
        ("failed-load-retry", 0),
        ("node", "n1"),
        ("node", 7),  # DASK_..._NODE=7 arrives as a number
        ("staging-dir", "/scratch/x"),
    ],
)
def test_good_worker_settings_pass(key, value):
    config.check_worker({**config.worker_settings(), key: value})


def test_the_readers_name_the_setting_whatever_the_parser_raises():
    # dask's parsers raise AttributeError, IndexError, KeyError... for these
    for value in ([1], "", "5 parsecs", float("inf"), True):
        with pytest.raises(SettingError, match=r"^dask-context\.adaptive\.keep-warm: "):
            config.get_seconds("adaptive.keep-warm", value)
        with pytest.raises(SettingError, match=r"^dask-context\.worker\.memory-budget: "):
            config.get_bytes("worker.memory-budget", value)


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_worker_with_a_bad_setting_leaves_instead_of_joining_half_set_up():
    with dask.config.set({KEY: BAD}):
        # process workers get the settings the cluster is created with
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    with cluster, Client(cluster) as client:
        with pytest.raises(SettingError, match=rf"^{KEY}: '{BAD}' is not a size"):
            dc.register(client, dc.ContextSpec("t", dict))
        assert wait_until(lambda: not client.scheduler_info()["workers"])
        assert dc.report(client)["workers"] == {}


def test_a_worker_started_with_a_bad_setting_in_its_environment_stops(tmp_path):
    """A ``dask worker`` with the setting in its environment joins a healthy cluster
    after the contexts were registered: it stops, its log names the setting, and the
    bad value reaches neither the router nor the other workers."""
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        assert dc.register(client, dc.ContextSpec("t", dict, kwargs={"x": 1})) == {"t": "added"}
        (good,) = client.scheduler_info()["workers"]
        log = tmp_path / "worker.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                 "--nthreads", "1", "--no-dashboard"],
                env={**os.environ, ENV: BAD}, stdout=out, stderr=subprocess.STDOUT,
            )
            try:
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = log.read_text()
        assert f"{KEY}: '{BAD}' is not a size" in text, text
        assert "invalid setting" in text and "dask-context-invalid-setting" in text, text
        assert list(client.scheduler_info()["workers"]) == [good]
        # the good worker keeps its budget; a worker restarted later gets no bad value
        budget = dc.report(client)["workers"][good]["budget"]
        assert budget is not None and not math.isinf(budget)
        client.restart()
        with dc.use("t"):
            assert client.submit(dc.get_context, "t", pure=False).result() == {"x": 1}
