"""An existing deployment: real ``dask scheduler`` and ``dask worker`` processes.

Contexts declared in Dask's configuration and set up by ``--preload dask_context``
serve any client without ``register``; a script run twice against the same cluster
neither fails nor loads again.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask.bag as db
import pytest
import yaml
from distributed import Client, LocalCluster

import dask_context as dc
from dask_context.factcheck import make_claims, verify
from dask_context.models import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def deployment(tmp_path: Path, contexts: list | None = None, workers: int = 2,
               preload: bool = True, nanny_preload: bool = False,
               env: dict[str, str] | None = None) -> Iterator[str]:
    """A scheduler and ``workers`` worker processes; yields the scheduler address.

    ``nanny_preload`` adds ``--preload-nanny dask_context`` to the workers; ``env``
    is added to every process's environment.
    """
    config = tmp_path / "dask-config"
    config.mkdir(exist_ok=True)
    (config / "dask-context.yaml").write_text(yaml.safe_dump({"dask-context": {"contexts": contexts or []}}))
    env = {**os.environ, "DASK_CONFIG": str(config), "PYTHONPATH": str(ROOT), **(env or {})}
    scheduler_file = tmp_path / "scheduler.json"
    preload = ["--preload", "dask_context"] if preload else []
    nanny = ["--preload-nanny", "dask_context"] if nanny_preload else []
    procs = [subprocess.Popen(
        ["dask", "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0",
         "--dashboard-address", ":0", *preload],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "scheduler.log", "w"),
    )]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert procs[0].poll() is None, (tmp_path / "scheduler.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        for i in range(workers):
            procs.append(subprocess.Popen(
                ["dask", "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                 "--memory-limit", "4GB", "--no-dashboard", "--name", f"w{i}", *preload, *nanny],
                env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"worker-{i}.log", "w"),
            ))
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address) as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_contexts_declared_in_config_serve_any_client_without_register(tmp_path, model_dir):
    declared = [{"name": "verifier", "loader": "dask_context.models:load_causal_lm",
                 "args": [str(model_dir)]}]
    with deployment(tmp_path, declared) as address, Client(address) as client:
        # README's pipeline, with no register() call
        claims = make_claims(60)
        with dc.use("verifier"):
            verdicts = db.from_sequence(claims, partition_size=6).map_partitions(verify)
        assert [v["claim"] for v in verdicts.compute()] == claims
        r = dc.report(client)["contexts"]["verifier"]
        assert r["tasks"] == 10 and 1 <= r["loads"] <= 2 and r["hits"] == 10
        # registering the identical spec from a client changes nothing
        spec = dc.ContextSpec("verifier", load_causal_lm, args=[str(model_dir)])
        assert dc.register(client, spec) == {"verifier": "declared"}
        with dc.use("verifier"):
            db.from_sequence(claims[:12], partition_size=6).map_partitions(verify).compute()
        assert dc.report(client)["contexts"]["verifier"]["loads"] == r["loads"]


@pytest.mark.parametrize("server", ["scheduler", "worker"])
def test_a_loader_that_cannot_be_imported_stops_the_start(tmp_path, server):
    config = tmp_path / "dask-config"
    config.mkdir()
    bad = [{"name": "verifier", "loader": "no_such_package.models:load"}]
    (config / "dask-context.yaml").write_text(yaml.safe_dump({"dask-context": {"contexts": bad}}))
    env = {**os.environ, "DASK_CONFIG": str(config)}
    with LocalCluster(n_workers=0, dashboard_address=":0") as cluster:
        args = (["scheduler", "--port", "0", "--dashboard-address", ":0"] if server == "scheduler"
                else ["worker", cluster.scheduler_address, "--no-dashboard"])
        proc = subprocess.run(["dask", *args, "--preload", "dask_context"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "dask-context: dask-context.contexts[0] ('verifier'): cannot import the loader " \
           "'no_such_package.models:load': No module named 'no_such_package'" in proc.stderr


def test_the_example_runs_twice_against_one_deployment(tmp_path, model_dir):
    claims = tmp_path / "claims.txt"
    claims.write_text("\n".join(make_claims(40)) + "\n")
    with deployment(tmp_path, preload=False) as address:
        outputs = []
        for run in range(2):
            out = subprocess.run(
                [sys.executable, str(ROOT / "examples" / "fact_verification.py"),
                 "--scheduler", address, "--model", str(model_dir), "--claims-file", str(claims),
                 "--out", str(tmp_path / f"verdicts-{run}.jsonl")],
                capture_output=True, text=True, timeout=240, cwd=tmp_path,
            )
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
            outputs.append(out.stdout)
        assert "new model loads: 0" in outputs[1], outputs[1]
        with Client(address) as client:
            loads = dc.report(client)["contexts"]["verifier"]["loads"]
        assert loads in (1, 2), loads  # one per worker at most, all in the first run
        assert (tmp_path / "verdicts-0.jsonl").read_text() == (tmp_path / "verdicts-1.jsonl").read_text()
