"""The core install: importing dask-context imports neither torch nor transformers.

They come with the ``llm`` extra and are imported only when a model is built or
loaded; a scheduler, a worker running other contexts, or a client stays light.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


def imported_modules(code: str) -> set[str]:
    """Every module a fresh interpreter imports to run ``code`` (``-X importtime``)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    return {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize("code", [
    "import dask_context",
    # the modules that use torch and transformers import them inside their functions
    "import dask_context.models, dask_context.factcheck, dask_context.tiers, dask_context.__main__",
])
def test_importing_dask_context_imports_no_heavy_package(code):
    modules = imported_modules(code)
    assert "dask_context" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"{code!r} imports {heavy[:5]}"


def test_a_release_outside_the_supported_range_fails_at_import():
    proc = subprocess.run(
        [sys.executable, "-c", "import distributed; distributed.__version__ = '2025.11.0'; import dask_context"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "dask-context supports dask and distributed >=2025.12.0,<2026.9.0" in proc.stderr
