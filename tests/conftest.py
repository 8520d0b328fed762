from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dask_context.models import make_model


def pytest_collection_modifyitems(config, items):
    if not items:
        raise pytest.UsageError("no tests collected: the suite must never pass empty")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint with its tokenizer, generated once per run."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny")


def slurm_available() -> bool:
    if not shutil.which("sinfo"):
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mixed", "alloc"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("slurm") and not slurm_available():
        if os.environ.get("DASK_CONTEXT_REQUIRE_SLURM") == "1":
            pytest.fail("SLURM is required here (DASK_CONTEXT_REQUIRE_SLURM=1) but sinfo finds no node")
        pytest.skip("no local SLURM: run .ci/start-slurm.sh (as root) to run these tests")
