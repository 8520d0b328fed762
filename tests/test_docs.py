"""Every code block in README.md and docs/ runs as written.

Blocks run in the order of their page, in a fresh directory per page: ``python``
blocks in one namespace per page (like notebook cells), ``bash`` blocks with bash.
Blocks in other languages (YAML, plain text) are not code and do not run, unless a
directive writes them to a file. A directive is an HTML comment on the line before a
block:

- ``<!-- docs-test: skip REASON -->``: the block does not run (installing packages,
  say); the reason is required.
- ``<!-- docs-test: file PATH -->``: the block is written to ``PATH``.
- ``<!-- docs-test: background until FILE has N workers -->``: a bash block that
  starts servers; it keeps running until the page is done, once ``FILE`` (a
  scheduler file) names a scheduler with ``N`` workers.
- ``<!-- docs-test: needs slurm -->`` / ``needs cuda``: runs only where there is
  one (SLURM is required in CI).

Placeholders are replaced before a block runs (:data:`PLACEHOLDERS`): a model path
by a generated model, ``Client(...)`` by a client of a fresh LocalCluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import slurm_available

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.S | re.M)


def placeholders(model_dir: Path, workdir: Path) -> dict[str, str]:
    """What a reader replaces in a block, and what the test replaces it with."""
    return {
        "/models/llm": str(model_dir),
        "/shared/models/llm": str(model_dir),
        "/shared/dask-config": str(workdir / "dask-config"),
        "Client(...)": "Client(__import__('distributed').LocalCluster(n_workers=2, "
                       "threads_per_worker=1, dashboard_address=':0'))",
        "load_claims()": "__import__('dask_context.factcheck').factcheck.make_claims(100)",
    }


@dataclass
class Block:
    lang: str
    code: str
    line: int
    directive: str | None


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        d = DIRECTIVE.fullmatch(before[-1].strip()) if before else None
        out.append(Block(m.group(1).lower(), m.group(2), text[: m.start()].count("\n") + 1,
                         d.group(1) if d else None))
    return out


def test_every_page_has_code_that_runs():
    runnable = [b for page in PAGES for b in blocks(page) if b.lang in CODE]
    assert len(runnable) > 10
    for page in PAGES:
        for b in blocks(page):
            if b.directive and b.directive.startswith("skip"):
                assert b.directive[4:].strip(), f"{page.name}:{b.line}: a skipped block needs a reason"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_code_blocks_run(page, tmp_path, model_dir):
    subs = placeholders(model_dir, tmp_path)
    # another test may have reset Dask's settings to a snapshot taken before
    # dask-jobqueue was imported: its defaults must be there for SLURMCluster
    with contextlib.suppress(ImportError):
        import dask_jobqueue.config

        dask_jobqueue.config.reconfigure()
    namespace: dict = {"__name__": "__docs__"}
    servers: list[subprocess.Popen] = []
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks(page):
            code = block.code
            for old, new in subs.items():
                code = code.replace(old, new)
            where = f"{page.name}:{block.line}"
            d = block.directive or ""
            if d.startswith("skip"):
                continue
            if d.startswith("needs "):
                need = d.split()[1]
                if need == "slurm" and not slurm_available():
                    if os.environ.get("DASK_CONTEXT_REQUIRE_SLURM") == "1":
                        pytest.fail(f"{where} needs SLURM, which is required here")
                    continue
                if need == "cuda" and not _cuda():
                    continue
            if d.startswith("file "):
                path = tmp_path / d.split(None, 1)[1]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(code)
            elif CODE.get(block.lang) == "python":
                exec(compile(code, where, "exec"), namespace)
            elif CODE.get(block.lang) == "bash":
                if d.startswith("background"):
                    servers.append(_background(code, d, where))
                else:
                    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code],
                                          capture_output=True, text=True, timeout=600)
                    assert done.returncode == 0, f"{where}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    finally:
        os.chdir(cwd)
        _close(namespace)
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def _background(code: str, directive: str, where: str) -> subprocess.Popen:
    m = re.fullmatch(r"background until (\S+) has (\d+) workers?", directive)
    assert m, f"{where}: unknown directive {directive!r}"
    proc = subprocess.Popen(["bash", "-c", code + "\nwait"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheduler_file, n = Path(m.group(1)), int(m.group(2))
    from distributed import Client

    deadline = time.monotonic() + 120
    while not scheduler_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{where}: no scheduler"
        time.sleep(0.1)
    with Client(json.loads(scheduler_file.read_text())["address"]) as client:
        client.wait_for_workers(n, timeout=120)
    return proc


def _close(namespace: dict) -> None:
    from distributed import Client
    from distributed.deploy import Cluster

    for value in namespace.values():
        if isinstance(value, Client):
            cluster = value.cluster
            value.close()
            if cluster is not None:
                cluster.close()
        elif isinstance(value, Cluster):
            value.close()


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
