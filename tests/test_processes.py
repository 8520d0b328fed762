"""Warm starts: worker processes forked from a server that imported torch and transformers.

Each cluster runs in a Python process of its own: the fork server and the
multiprocessing method are settings of the whole process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import dask
import pytest
from distributed import Client

import dask_context as dc
from dask_context.errors import SettingError
from tests.test_deploy import ROOT, deployment

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no forkserver on Windows")

SCRIPT = textwrap.dedent("""
    import json, logging, os, signal, sys, time
    import dask.bag as db
    from distributed import Client, LocalCluster
    import dask_context as dc
    from dask_context.factcheck import make_claims, verify
    from dask_context.models import load_causal_lm

    def look():
        import multiprocessing, sys
        return {"preloaded": "transformers" in sys.modules, "pid": os.getpid(),
                "env": os.environ.get("DC_NANNY_ENV"),
                "method": multiprocessing.get_start_method()}

    def threads():
        import torch
        return torch.get_num_threads()

    if __name__ == "__main__":
        warm, model_dir = sys.argv[1] == "warm", sys.argv[2]
        warned = []
        handler = logging.Handler()
        handler.emit = lambda record: warned.append(record.getMessage())
        logging.getLogger("dask_context.processes").addHandler(handler)
        preload = dc.warm_starts() if warm else None
        out = {"preload": preload}
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=":0", env={"DC_NANNY_ENV": "set"}) as cluster, \\
                Client(cluster) as client:
            out["start"] = list(client.run(look).values())
            dc.register(client, dc.ContextSpec("verifier", load_causal_lm, args=[model_dir]))
            claims = make_claims(40)
            with dc.use("verifier"):
                bag = db.from_sequence(claims, partition_size=4).map_partitions(verify)
            out["first"] = [v["claim"] for v in bag.compute()] == claims
            out["threads"] = sorted(client.run(threads).values())
            # a worker killed: its nanny starts another process, warm as the first
            victim = out["start"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while True:
                now = list(client.run(look, on_error="ignore").values())
                if len(now) == 2 and victim not in [w["pid"] for w in now]:
                    break
                assert time.monotonic() < deadline, now
                time.sleep(0.1)
            out["restarted"] = now
            with dc.use("verifier"):
                bag = db.from_sequence(claims, partition_size=4).map_partitions(verify)
            out["second"] = [v["claim"] for v in bag.compute()] == claims
            out["loads"] = dc.report(client)["contexts"]["verifier"]["loads"]
            if warm:
                # too late for this process's fork server: said, not silently ignored
                out["late"] = dc.warm_starts(["json.decoder"])
        out["warned"] = warned
        print("RESULT " + json.dumps(out))
""")


def _run(tmp_path, mode: str, model_dir) -> dict:
    script = tmp_path / "cluster.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(model_dir)], capture_output=True, text=True,
        timeout=400, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_warm_starts_fork_workers_with_torch_imported_restarts_included(tmp_path, model_dir):
    out = _run(tmp_path, "warm", model_dir)
    assert {"torch", "transformers"} <= set(out["preload"])
    for state in out["start"] + out["restarted"]:
        assert state["preloaded"], state
        # what a nanny sets for its worker still reaches it
        assert state["env"] == "set", state
    assert out["first"] and out["second"]
    # one load per worker process at most: two, and the restarted one if it warms
    assert 2 <= out["loads"] <= 3
    # torch in a forked worker still takes the worker's thread count
    assert out["threads"] == [1, 1]
    assert "json.decoder" not in out["late"]
    assert any("json.decoder" in w and "already" in w for w in out["warned"]), out["warned"]


def test_without_warm_starts_workers_start_cold(tmp_path, model_dir):
    # the control: spawned workers import transformers only when a task needs it
    out = _run(tmp_path, "cold", model_dir)
    assert not any(state["preloaded"] for state in out["start"] + out["restarted"])
    assert out["first"] and out["second"] and 2 <= out["loads"] <= 3


def test_dask_worker_preload_nanny_starts_workers_warm(tmp_path):
    with deployment(tmp_path, workers=1, nanny_preload=True,
                    env={"DASK_DASK_CONTEXT__PROCESSES__WARM_STARTS": "true"}) as address, \
            Client(address) as client:
        preloaded = client.run(lambda: "transformers" in sys.modules)
    assert list(preloaded.values()) == [True]


def test_bad_warm_start_settings_name_the_problem():
    with pytest.raises(ValueError, match="no_such_module_here"):
        dc.warm_starts(["torch", "no_such_module_here"])
    with dask.config.set({"dask-context.processes.preload": "torch"}), \
            pytest.raises(SettingError, match=r"dask-context\.processes\.preload"):
        dc.warm_starts()
    # neither error changed how this process starts workers
    assert dask.config.get("distributed.worker.multiprocessing-method") == "spawn"
