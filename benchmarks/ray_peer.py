"""The Ray Data peer: ``map_batches`` with a callable class on an actor pool.

Each actor loads the model once in ``__init__`` (the idiomatic way to keep a model
warm in Ray Data) and judges one batch of ``B`` claims per call. It runs in a
subprocess (``python -m benchmarks.ray_peer SPEC OUT``) so that Ray's processes,
environment and temp files stay away from the Dask clusters of the other arms.

Settings taken from ``shared/notes/peers-and-style.md``: a fixed pool
``ActorPoolStrategy(size=W)`` with ``num_cpus=0.5`` per actor (with ``num_cpus=1``
on 2 CPUs the actors take every CPU and the read task never runs: ray#44687), the
whole workload as one Dataset execution (Ray rebuilds the pool per execution), and
``RAY_AUTH_MODE=disabled``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loading import load_model
from dask_context.factcheck import judge, make_claims

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


def available() -> bool:
    """Whether ``ray[data]`` is importable here."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


class RayVerifier:
    """Ray Data UDF: the model is loaded once per actor."""

    def __init__(self, path: str, load: dict[str, Any], threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.model = load_model(path, **load)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = judge(self.model, [str(c) for c in batch["claim"]])
        return {
            "i": batch["i"],
            "claim": batch["claim"],
            "verdict": np.array([r["verdict"] for r in rows]),
        }


def execute(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the subprocess: start Ray, run the Dataset once, time it."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    temp = tempfile.mkdtemp(prefix="ray-bench-")
    try:
        t0 = time.perf_counter()
        ray.init(
            num_cpus=spec["workers"], include_dashboard=False, log_to_driver=False,
            object_store_memory=512 * 2**20, _temp_dir=temp,
        )
        init_seconds = time.perf_counter() - t0
        DataContext.get_current().enable_progress_bars = False
        claims = make_claims(spec["items"], seed=spec["seed"])
        batch = spec["batch"]
        start = time.time()
        ds = ray.data.from_items(
            [{"i": i, "claim": c} for i, c in enumerate(claims)],
            override_num_blocks=max(1, len(claims) // batch),
        )
        rows = ds.map_batches(
            RayVerifier,
            fn_constructor_kwargs={"path": spec["path"], "load": spec["load"], "threads": spec["threads"]},
            batch_size=batch,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=spec["workers"]),
            num_cpus=0.5,
        ).take_all()
        stop = time.time()
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    order = sorted(rows, key=lambda r: int(r["i"]))
    if [str(r["claim"]) for r in order] != claims:
        raise AssertionError("Ray returned missing, duplicated or wrong rows")
    verdicts: dict[str, int] = {}
    for r in order:
        verdicts[str(r["verdict"])] = verdicts.get(str(r["verdict"]), 0) + 1
    return {"wall": stop - start, "start": start, "stop": stop, "init_seconds": init_seconds, "verdicts": verdicts}


def run_ray(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`execute` in a subprocess; return its result, or ``{"error": ...}``.

    Parameters
    ----------
    spec
        ``workers``, ``items``, ``seed``, ``batch``, ``path``, ``load`` (keyword
        arguments of :func:`benchmarks.loading.load_model`) and ``threads``.
    timeout
        Seconds before the subprocess is killed (Ray Data can hang; see the notes).
    """
    with tempfile.TemporaryDirectory(prefix="ray-peer-") as tmp:
        spec_file, out_file = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_file.write_text(json.dumps(spec))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "RAY_AUTH_MODE": "disabled",
            "OMP_NUM_THREADS": str(spec["threads"]),
            "RAY_DEDUP_LOGS": "0",
        }
        cmd = [sys.executable, "-m", "benchmarks.ray_peer", str(spec_file), str(out_file)]
        # a session of its own: on a timeout, Ray's helper processes go with the driver
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out_file.exists():
            tail = output.strip().splitlines()[-5:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
        return json.loads(out_file.read_text())


def main(argv: list[str] | None = None) -> None:
    spec_file, out_file = (argv or sys.argv[1:])[:2]
    logging.basicConfig(level=logging.WARNING)
    result = execute(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
