from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from dask_context.models import make_model


def pytest_collection_modifyitems(config, items):
    if not items:
        raise pytest.UsageError("no tests collected: the suite must never pass empty")
    slurm_tests = [item for item in items if item.get_closest_marker("slurm")]
    if not slurm_tests or slurm_available():
        return
    if os.environ.get("DASK_CONTEXT_REQUIRE_SLURM") == "1":
        raise pytest.UsageError(
            "SLURM is required here (DASK_CONTEXT_REQUIRE_SLURM=1) but sinfo finds no node"
        )
    no_slurm = pytest.mark.skipif(
        True, reason="no local SLURM: run .ci/start-slurm.sh (as root) to run these tests"
    )
    for item in slurm_tests:
        item.add_marker(no_slurm)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint with its tokenizer, generated once per run."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny")


def slurm_available() -> bool:
    if not shutil.which("sinfo"):
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False)
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mixed", "alloc"))


@pytest.fixture(autouse=True)
def _dask_context_logs_reach_caplog():
    """dask_context's loggers do not propagate outside tests (as distributed's own,
    see dask_context._logging); caplog listens on the root logger."""
    logger = logging.getLogger("dask_context")
    old, logger.propagate = logger.propagate, True
    yield
    logger.propagate = old


@pytest.fixture
def client():
    """A LocalCluster of two process workers with one thread each, and its client."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        yield client
