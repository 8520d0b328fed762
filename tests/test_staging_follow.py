"""Peer bootstrap: workers follow a copy of a context's files while it is being made.

One worker of the cluster reads ``spec.files`` (the router's turn); the others do not
wait for its copy to be complete: they stream each file from it as it lands there
and check it against the size and CRC-32 the source copy computed. These
tests hold the source copy half-way (a gate in :meth:`Stager.read_source`) to see
the followers move meanwhile, and make it fail, lie or die there.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster

import dask_context as dc
from dask_context import staging
from dask_context.staging import COPYING, Stager
from tests.test_staging import context_of, on_node, read_tree, spec_for, worker_events

# several of a follower's receive buffers: it writes what it received before the end
SIZE = 4 * staging.STREAM_BUFFER
PIECE = 1 << 20

pytestmark = [
    pytest.mark.filterwarnings("ignore:Tasks of .* are pinned to workers"),
    pytest.mark.filterwarnings("ignore:Tasks of .* but were not marked as needing it"),
]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """The files of a context on the "shared filesystem": weights of several pieces."""
    root = tmp_path / "shared" / "weights"
    root.mkdir(parents=True)
    (root / "model.bin").write_bytes(os.urandom(SIZE))
    (root / "config.json").write_text('{"layers": 2}')
    (root / "empty").write_bytes(b"")
    return root


class Gate:
    """Holds :meth:`Stager.read_source` of in-process workers half-way through the weights.

    ``reads``: bytes read from the source by each worker; ``held``: set once the
    weights' first half is read; the read goes on once ``opened`` is set (or
    raises ``fail`` instead).
    """

    def __init__(self) -> None:
        self.reads: dict[str, int] = {}
        self.held = threading.Event()
        self.opened = threading.Event()
        self.fail: Exception | None = None
        self.first: str | None = None

    def read(self, stager: Stager, path: str) -> Iterator[bytes]:
        me = stager.worker.address
        with open(path, "rb") as f:
            while data := f.read(PIECE):
                self.reads[me] = self.reads.get(me, 0) + len(data)
                yield data
                if path.endswith("model.bin") and self.reads[me] >= SIZE // 2 and self.first in (None, me):
                    self.first = me
                    self.held.set()
                    if not self.opened.wait(30):
                        raise TimeoutError("the gate was never opened")
                    if self.fail is not None:
                        raise self.fail


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    g = Gate()
    def read_source(stager: Stager, path: str) -> Iterator[bytes]:
        return g.read(stager, path)

    monkeypatch.setattr(Stager, "read_source", read_source)
    return g


def written(node: Path) -> int:
    """Bytes of data (not the space allocated up front) in the copy being made on ``node``."""
    for f in node.glob(".tmp-*/weights/model.bin"):
        with open(f, "rb") as fh:
            data = fh.read()
        return len(data.rstrip(b"\0"))
    return 0


# ---------------------------------------------------------------- following
@gen_cluster(client=True, nthreads=[])
async def test_a_cold_worker_follows_the_copy_being_made_instead_of_waiting(c, s, tmp_path, shared, gate):
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        first = c.submit(context_of, "W", workers=[a.address], pure=False)
        await async_poll_for(gate.held.is_set, timeout=10)
        second = c.submit(context_of, "W", workers=[b.address], pure=False)
        # the source copy is held half-way: the follower has its first half already
        # (waiting for the complete copy, it would have nothing)
        await async_poll_for(lambda: written(tmp_path / "n2") >= SIZE // 2, timeout=10)
        assert not (tmp_path / "n1" / spec_for(shared).token).exists()
        gate.opened.set()
        got_a, got_b = await first, await second
        staged = await worker_events(c, "staged", 2)
    assert gate.reads == {a.address: SIZE + len('{"layers": 2}')}  # the source was read once
    by_worker = {e["worker"]: e for e in staged}
    assert (by_worker[a.address]["origin"], by_worker[b.address]["origin"]) == ("files", "peer")
    assert by_worker[b.address]["peer"] == a.address
    assert got_a["files"] == got_b["files"] == read_tree(str(shared))["files"]
    # the follower's manifest is the source copy's: it serves peers in turn
    manifests = [(tmp_path / n / spec_for(shared).token / "manifest.json").read_text() for n in ("n1", "n2")]
    assert manifests[0] == manifests[1]


@gen_cluster(client=True, nthreads=[])
async def test_a_source_copy_that_fails_leaves_its_followers_no_partial_file(c, s, tmp_path, shared, gate):
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        first = c.submit(context_of, "W", workers=[a.address], pure=False)
        await async_poll_for(gate.held.is_set, timeout=10)
        second = c.submit(context_of, "W", workers=[b.address], pure=False)
        await async_poll_for(lambda: written(tmp_path / "n2") >= SIZE // 2, timeout=10)
        gate.fail = OSError("shared filesystem went away")
        with captured_logger("dask_context.staging", level=logging.WARNING) as log:
            gate.opened.set()
            got_a, got_b = await first, await second
            staged = await worker_events(c, "staged", 1)
    # the follower's stream ended short: it took the turn and read the source itself
    assert f"the stream ended after {SIZE // 2} of {SIZE} bytes" in log.getvalue()
    assert [(e["worker"], e["origin"]) for e in staged] == [(b.address, "files")]
    assert got_b["files"] == read_tree(str(shared))["files"]
    assert got_a["path"] == str(shared)  # the failed stager's loader read the source
    assert not list((tmp_path / "n2").glob(".tmp-*"))


@gen_cluster(client=True, nthreads=[])
async def test_a_followed_file_that_does_not_match_the_source_copy_is_fetched_again(
        c, s, tmp_path, shared, gate, monkeypatch):
    send_entry = staging._send_entry
    lied = []

    def lying(conn, entry):
        # the first entry of the weights comes with a CRC-32 their bytes do not have
        if entry["path"].endswith("model.bin") and not lied:
            lied.append(entry["path"])
            entry = {**entry, "crc32": entry["crc32"] ^ 1}
        send_entry(conn, entry)

    monkeypatch.setattr(staging, "_send_entry", lying)
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        first = c.submit(context_of, "W", workers=[a.address], pure=False)
        await async_poll_for(gate.held.is_set, timeout=10)
        second = c.submit(context_of, "W", workers=[b.address], pure=False)
        await async_poll_for(lambda: written(tmp_path / "n2") >= SIZE // 2, timeout=10)
        with captured_logger("dask_context.staging", level=logging.WARNING) as log:
            gate.opened.set()
            await first
            got = await second
            staged = await worker_events(c, "staged", 2)
    assert lied and "does not match the source's copy" in log.getvalue()
    # thrown away, then fetched from the complete copy; the source was read once
    assert {e["worker"]: e["origin"] for e in staged} == {a.address: "files", b.address: "peer"}
    assert list(gate.reads) == [a.address]
    assert got["files"] == read_tree(str(shared))["files"]


@gen_cluster(client=True, nthreads=[])
async def test_workers_starting_together_all_follow_the_one_source_copy(c, s, tmp_path, shared, gate):
    await dc.register(c, dc.ContextSpec("other", dict))
    async with on_node(s, tmp_path, "n1") as w1, on_node(s, tmp_path, "n2") as w2, on_node(s, tmp_path, "n3") as w3:
        spec = spec_for(shared, eager=True)
        await dc.register(c, spec)
        await async_poll_for(gate.held.is_set, timeout=10)
        nodes = {w1.address: "n1", w2.address: "n2", w3.address: "n3"}
        others = [n for a, n in nodes.items() if a != gate.first]
        await async_poll_for(lambda: all(written(tmp_path / n) >= SIZE // 2 for n in others), timeout=10)
        gate.opened.set()
        staged = await worker_events(c, "staged", 3)
    assert len(gate.reads) == 1
    assert sorted(e["origin"] for e in staged) == ["files", "peer", "peer"]
    for n in ("n1", "n2", "n3"):
        copy = tmp_path / n / spec.token / "weights" / "model.bin"
        assert copy.read_bytes() == (shared / "model.bin").read_bytes()


# ---------------------------------------------------------------- a source that dies
SLOW_SOURCE = '''
import time
from dask_context.staging import Stager

def slow(self, path):
    # a shared filesystem of about 2.5 MB/s: the copy is under way for seconds
    with open(path, "rb") as f:
        while data := f.read(128 << 10):
            time.sleep(0.05)
            yield data

Stager.read_source = slow
'''


@gen_cluster(client=True, nthreads=[], timeout=60)
async def test_a_source_worker_killed_mid_stream_leaves_the_follower_to_read_the_files(c, s, tmp_path, shared):
    preload = tmp_path / "slow_source.py"
    preload.write_text(SLOW_SOURCE)
    await dc.register(c, spec_for(shared))
    env = {
        **os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "DASK_DASK_CONTEXT__WORKER__NODE": "n1",
        "DASK_DASK_CONTEXT__WORKER__STAGING_DIR": str(tmp_path / "n1"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", s.address, "--no-nanny", "--nthreads", "1",
         "--preload", str(preload), "--name", "source"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "w"),
    )
    try:
        await async_poll_for(lambda: len(s.workers) == 1, timeout=30)
        (source,) = s.workers
        first = c.submit(context_of, "W", workers=[source], pure=False)  # noqa: F841 - kept: it runs
        topic = COPYING.format(token=spec_for(shared).token)
        await async_poll_for(lambda: s.get_events(topic), timeout=30)
        async with on_node(s, tmp_path, "n2") as b:
            second = c.submit(context_of, "W", workers=[b.address], pure=False)
            await async_poll_for(lambda: written(tmp_path / "n2") >= staging.STREAM_BUFFER, timeout=30)
            with captured_logger("dask_context.staging", level=logging.WARNING) as log:
                proc.send_signal(signal.SIGKILL)
                got = await second
            staged = [e for e in await worker_events(c, "staged", 1) if e["worker"] == b.address]
    finally:
        proc.kill()
        proc.wait()
    assert "Following the copy of context 'W'" in log.getvalue()
    assert "the stream ended after" in log.getvalue()
    assert [e["origin"] for e in staged] == ["files"]
    assert got["files"] == read_tree(str(shared))["files"]
    assert not list((tmp_path / "n2").glob(".tmp-*"))



@gen_cluster(client=True, nthreads=[])
async def test_workers_beyond_the_followers_allowed_wait_for_a_complete_copy(c, s, tmp_path, shared, gate,
                                                                              monkeypatch):
    monkeypatch.setattr(staging, "FOLLOWERS", 1)
    places = []
    follow = staging._Progress.follow

    def counting(self):
        places.append(follow(self))
        return places[-1]

    monkeypatch.setattr(staging._Progress, "follow", counting)
    await dc.register(c, dc.ContextSpec("other", dict))
    async with on_node(s, tmp_path, "n1"), on_node(s, tmp_path, "n2"), on_node(s, tmp_path, "n3"):
        spec = spec_for(shared, eager=True)
        await dc.register(c, spec)
        await async_poll_for(gate.held.is_set, timeout=10)
        # one follower has its place; the other was refused one (it asks again while it waits)
        await async_poll_for(lambda: True in places and False in places, timeout=10)
        gate.opened.set()
        staged = await worker_events(c, "staged", 3)
    assert places.count(True) == 1
    assert len(gate.reads) == 1
    assert sorted(e["origin"] for e in staged) == ["files", "peer", "peer"]
    for n in ("n1", "n2", "n3"):
        copy = tmp_path / n / spec.token / "weights" / "model.bin"
        assert copy.read_bytes() == (shared / "model.bin").read_bytes()
