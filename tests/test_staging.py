"""Peer bootstrap: a context's files are staged node-locally, from peers when they can be.

Several nodes are emulated on one machine: each in-process worker starts with its own
``dask-context.worker.node`` and ``staging-dir`` settings (read when its plugins are
set up, while it starts). Reads of the "shared filesystem" (``spec.files``) are
counted by wrapping :meth:`Stager.read_source`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import dask
import pytest
from distributed import Scheduler, Worker
from distributed.utils_test import async_poll_for, captured_logger, gen_cluster

import dask_context as dc
from dask_context import ContextSpec, staging
from dask_context.models import load_causal_lm
from dask_context.staging import Stager

SIZE = 300_000

# tasks are pinned to the worker whose staging is under test; routing is not
pytestmark = [
    pytest.mark.filterwarnings("ignore:Tasks of .* are pinned to workers"),
    pytest.mark.filterwarnings("ignore:Tasks of .* but were not marked as needing it"),
]


def read_tree(path: str) -> dict:
    """Loader: every file under ``path`` with its digest."""
    files = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, path)] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
    return {"path": path, "files": files}


def context_of(name: str) -> dict:
    """Task: the worker's context ``name``."""
    return dc.get_context(name)


def next_token(name: str) -> list:
    """Task: the model's log-probabilities of two candidate words."""
    return dc.get_context(name).next_token_logprobs(["the claim is"], ["true", "false"]).tolist()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """The files of a context on the "shared filesystem"."""
    root = tmp_path / "shared" / "weights"
    (root / "sub").mkdir(parents=True)
    (root / "model.bin").write_bytes(os.urandom(SIZE))
    (root / "config.json").write_text('{"layers": 2}')
    (root / "sub" / "vocab.txt").write_text("a\nb\n")
    (root / "empty").write_bytes(b"")
    return root


@pytest.fixture
def source_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes read from ``spec.files``, by every worker of the test."""
    counts = {"bytes": 0}
    original = Stager.read_source

    def counting(self: Stager, path: str) -> Iterator[bytes]:
        for data in original(self, path):
            counts["bytes"] += len(data)
            yield data

    monkeypatch.setattr(Stager, "read_source", counting)
    return counts


def spec_for(files: Path, name: str = "W", **kwargs) -> ContextSpec:
    return ContextSpec(name, read_tree, files=files, **kwargs)


def total_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@contextlib.asynccontextmanager
async def on_node(s: Scheduler, tmp: Path, node: str) -> AsyncIterator[Worker]:
    """A worker of node ``node``, staging into ``tmp/<node>``."""
    settings = {"dask-context.worker.node": node, "dask-context.worker.staging-dir": str(tmp / node)}
    with dask.config.set(settings):
        worker = await Worker(s.address, nthreads=1)
    try:
        yield worker
    finally:
        await worker.close()


async def load_on(c, worker: Worker, name: str = "W") -> dict:
    return await c.submit(context_of, name, workers=[worker.address], pure=False)


async def worker_events(c, action: str, n: int = 1) -> list[dict]:
    """The events ``action`` of the workers so far, once there are ``n``."""
    for _ in range(100):
        found = [m for _, m in await c.get_events("dask-context") if m.get("action") == action]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} {action!r} events: {found}")


# ---------------------------------------------------------------- where copies come from
@gen_cluster(client=True, nthreads=[])
async def test_a_cold_worker_fetches_the_files_from_a_warm_peer(c, s, tmp_path, shared, source_reads):
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        first = await load_on(c, a)
        assert source_reads["bytes"] == total_bytes(shared)
        second = await load_on(c, b)
        # the shared filesystem was read once; the second copy came from the peer
        assert source_reads["bytes"] == total_bytes(shared)
        staged = await worker_events(c, "staged", 2)
    assert [(e["worker"], e["origin"], e["peer"]) for e in staged] == [
        (a.address, "files", None), (b.address, "peer", a.address),
    ]
    assert staged[1]["nbytes"] == total_bytes(shared)
    # each loader got its node's copy, under the name of the original directory
    assert first["path"] == str(tmp_path / "n1" / spec_for(shared).token / "weights")
    assert second["path"] == str(tmp_path / "n2" / spec_for(shared).token / "weights")
    assert first["files"] == second["files"] == read_tree(str(shared))["files"]


@gen_cluster(client=True, nthreads=[])
async def test_workers_of_one_node_share_its_copy(c, s, tmp_path, shared, source_reads):
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n1") as b:
        first = await load_on(c, a)
        second = await load_on(c, b)
        staged = await worker_events(c, "staged", 2)
    assert source_reads["bytes"] == total_bytes(shared)
    assert [(e["origin"], e["nbytes"]) for e in staged] == [("files", total_bytes(shared)), ("node", 0)]
    assert first["path"] == second["path"]


@gen_cluster(client=True, nthreads=[])
async def test_a_replacement_worker_uses_its_nodes_copy(c, s, tmp_path, shared, source_reads):
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a:
        await load_on(c, a)
    # the worker closed (preempted, say): its node keeps the copy
    async with on_node(s, tmp_path, "n1") as b:
        got = await load_on(c, b)
        staged = await worker_events(c, "staged", 2)
    assert source_reads["bytes"] == total_bytes(shared)
    assert staged[1]["origin"] == "node"
    assert got["files"] == read_tree(str(shared))["files"]


@gen_cluster(client=True, nthreads=[])
async def test_cold_workers_starting_together_read_the_files_once(c, s, tmp_path, shared, source_reads):
    # another context sets dask-context up on each worker as it starts, with its node
    await dc.register(c, ContextSpec("other", dict))
    async with on_node(s, tmp_path, "n1"), on_node(s, tmp_path, "n2"), on_node(s, tmp_path, "n3"):
        # an eager context: the three workers stage it at once
        await dc.register(c, spec_for(shared, eager=True))
        staged = await worker_events(c, "staged", 3)
    assert source_reads["bytes"] == total_bytes(shared)
    assert sorted(e["origin"] for e in staged) == ["files", "peer", "peer"]


@gen_cluster(client=True, nthreads=[])
async def test_unregister_and_replace_remove_the_copies(c, s, tmp_path, shared):
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a:
        old = spec_for(shared).token
        await load_on(c, a)
        assert (tmp_path / "n1" / old).is_dir()
        new = spec_for(shared, load_time=5)
        await dc.register(c, new, replace=True)
        await async_poll_for(lambda: not (tmp_path / "n1" / old).exists(), timeout=5)
        await load_on(c, a)
        assert (tmp_path / "n1" / new.token).is_dir()
        await dc.unregister(c, "W")
        await async_poll_for(lambda: not (tmp_path / "n1" / new.token).exists(), timeout=5)
    unstaged = await worker_events(c, "unstaged", 2)
    assert [m["token"] for m in unstaged] == [old, new.token]


# ---------------------------------------------------------------- failures fall back
@gen_cluster(client=True, nthreads=[])
async def test_a_failing_peer_falls_back_to_the_files(c, s, tmp_path, shared, source_reads):
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        await load_on(c, a)

        async def broken(**kwargs):
            raise OSError("disk read error")

        a.handlers["dask_context_stream"] = a.handlers["dask_context_chunk"] = broken
        with captured_logger("dask_context.staging", level=logging.WARNING) as log:
            got = await load_on(c, b)
        staged = await worker_events(c, "staged", 2)
    assert "disk read error" in log.getvalue()
    assert staged[1]["origin"] == "files"
    assert source_reads["bytes"] == 2 * total_bytes(shared)
    assert got["files"] == read_tree(str(shared))["files"]


async def no_stream(**kwargs):
    """A peer's answer to ``dask_context_stream`` where it cannot stream."""
    return None


@gen_cluster(client=True, nthreads=[])
async def test_a_peer_that_cannot_stream_sends_the_files_over_dask_comms(c, s, tmp_path, shared):
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        await load_on(c, a)
        chunks = []
        serve = a.handlers["dask_context_chunk"]

        async def counting(**kwargs):
            chunks.append(kwargs["path"])
            return await serve(**kwargs)

        a.handlers["dask_context_stream"] = no_stream
        a.handlers["dask_context_chunk"] = counting
        got = await load_on(c, b)
        staged = await worker_events(c, "staged", 2)
    assert (staged[1]["origin"], staged[1]["peer"]) == ("peer", a.address)
    assert "weights/model.bin" in chunks
    assert got["files"] == read_tree(str(shared))["files"]


@gen_cluster(client=True, nthreads=[])
async def test_a_peer_leaving_mid_transfer_falls_back_to_the_files(c, s, tmp_path, shared, monkeypatch):
    monkeypatch.setattr(staging, "CHUNK", 16 << 10)  # many chunks: the transfer takes a while
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a:
        await load_on(c, a)
        a.handlers["dask_context_stream"] = no_stream  # chunks over Dask's comms
        served = []
        serve = a.handlers["dask_context_chunk"]

        async def slow(**kwargs):
            served.append(kwargs["offset"])
            await asyncio.sleep(0.05)
            return await serve(**kwargs)

        a.handlers["dask_context_chunk"] = slow
        async with on_node(s, tmp_path, "n2") as b:
            loading = c.submit(context_of, "W", workers=[b.address], pure=False)
            await async_poll_for(lambda: len(served) >= 3, timeout=5)
            await a.close()
            got = await loading
            staged = await worker_events(c, "staged", 2)
    assert len(served) < SIZE // (16 << 10)  # it left mid-transfer
    assert (staged[1]["worker"], staged[1]["origin"]) == (b.address, "files")
    assert got["files"] == read_tree(str(shared))["files"]
    assert not list((tmp_path / "n2").glob(".tmp-*"))  # the partial copy is gone


@gen_cluster(client=True, nthreads=[])
async def test_a_stream_that_ends_early_falls_back_to_the_files(c, s, tmp_path, shared, monkeypatch):
    def half(conn, path):
        # the peer dies mid-file: its connection closes
        conn.sendall(Path(path).read_bytes()[: SIZE // 2])

    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        await load_on(c, a)
        monkeypatch.setattr(staging, "_send_file", half)
        with captured_logger("dask_context.staging", level=logging.WARNING) as log:
            got = await load_on(c, b)
        staged = await worker_events(c, "staged", 2)
    assert f"the stream ended after {SIZE // 2} of {SIZE} bytes" in log.getvalue()
    assert staged[1]["origin"] == "files"
    assert got["files"] == read_tree(str(shared))["files"]
    assert not list((tmp_path / "n2").glob(".tmp-*"))


@gen_cluster(client=True, nthreads=[])
async def test_bytes_corrupted_on_the_wire_are_caught_and_fetched_again(c, s, tmp_path, shared, monkeypatch):
    sent = []
    send_file = staging._send_file

    def flipping(conn, path):
        # the first transfer of the weights gets one byte flipped on its way
        sent.append(path)
        if path.endswith("model.bin") and sum(p.endswith("model.bin") for p in sent) == 1:
            data = bytearray(Path(path).read_bytes())
            data[SIZE // 3] ^= 0x01
            conn.sendall(data)
        else:
            send_file(conn, path)

    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        await load_on(c, a)
        await load_on(c, b)
        monkeypatch.setattr(staging, "_send_file", flipping)
        async with on_node(s, tmp_path, "n3") as d:
            with captured_logger("dask_context.staging", level=logging.WARNING) as log:
                got = await load_on(c, d)
            staged = await worker_events(c, "staged", 3)
    # the corrupt copy was thrown away, and the files fetched again from the other peer
    assert "model.bin from" in log.getvalue() and "does not match the manifest" in log.getvalue()
    assert staged[2]["origin"] == "peer"
    assert got["files"] == read_tree(str(shared))["files"]
    copy = tmp_path / "n3" / spec_for(shared).token / "weights" / "model.bin"
    assert copy.read_bytes() == (shared / "model.bin").read_bytes()
    assert sum(p.endswith("model.bin") for p in sent) == 2


@pytest.mark.parametrize("streams", [True, False])
@gen_cluster(client=True, nthreads=[])
async def test_a_corrupt_copy_from_a_peer_is_never_used(c, s, tmp_path, shared, streams):
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        await load_on(c, a)
        if not streams:
            a.handlers["dask_context_stream"] = no_stream  # chunks over Dask's comms
        # one flipped byte in the peer's copy, same size: only its CRC-32 tells
        weights = tmp_path / "n1" / spec_for(shared).token / "weights" / "model.bin"
        data = bytearray(weights.read_bytes())
        data[1000] ^= 0xFF
        weights.write_bytes(data)
        with captured_logger("dask_context.staging", level=logging.WARNING) as log:
            got = await load_on(c, b)
        staged = await worker_events(c, "staged", 2)
    assert "does not match the manifest" in log.getvalue()
    assert staged[1]["origin"] == "files"
    assert got["files"] == read_tree(str(shared))["files"]


@gen_cluster(client=True, nthreads=[])
async def test_partial_copies_on_a_node_are_never_used(c, s, tmp_path, shared):
    await dc.register(c, spec_for(shared))
    token = spec_for(shared).token
    async with on_node(s, tmp_path, "n1") as a:
        await load_on(c, a)
    # a truncated file in the node's copy, and a stager that died mid-copy
    (tmp_path / "n1" / token / "weights" / "model.bin").write_bytes(b"partial")
    leftover = tmp_path / "n1" / f".tmp-{token}-dead"
    (leftover / "weights").mkdir(parents=True)
    (leftover / "weights" / "model.bin").write_bytes(b"partial")
    async with on_node(s, tmp_path, "n1") as b:
        got = await load_on(c, b)
        staged = await worker_events(c, "staged", 2)
    assert staged[1]["origin"] == "files"
    assert got["files"] == read_tree(str(shared))["files"]
    assert not leftover.exists()


@gen_cluster(client=True, nthreads=[])
async def test_files_that_cannot_be_staged_are_read_where_they_are(c, s, tmp_path, shared):
    (tmp_path / "n1").write_text("a file where the staging directory should be")
    await dc.register(c, spec_for(shared))
    async with on_node(s, tmp_path, "n1") as a:
        with captured_logger("dask_context.staging", level=logging.WARNING) as log:
            got = await load_on(c, a)
    assert "Could not stage" in log.getvalue()
    assert got["path"] == str(shared)


@gen_cluster(client=True, nthreads=[])
async def test_peers_are_served_only_files_of_a_manifest(c, s, tmp_path, shared):
    await dc.register(c, spec_for(shared))
    token = spec_for(shared).token
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        await load_on(c, a)
        peer = b.rpc(a.address)
        manifest = await peer.dask_context_manifest(token=token)
        assert {e["path"] for e in manifest["files"]} == {
            "weights/model.bin", "weights/config.json", "weights/sub/vocab.txt", "weights/empty",
        }
        chunk = await peer.dask_context_chunk(token=token, path="weights/config.json", offset=2, size=6)
        assert chunk == b"layers"
        with pytest.raises(Exception, match="no file"):
            await peer.dask_context_chunk(token=token, path="weights/../../../n2", offset=0, size=10)
        with pytest.raises(Exception, match="no file"):
            await peer.dask_context_stream(token=token, path="weights/../../../n2")
        with pytest.raises(Exception, match="not a context token"):
            await peer.dask_context_manifest(token="../n2")
        # a stream goes only to the connection that brings its ticket
        offer = await peer.dask_context_stream(token=token, path="weights/config.json")
        reader, writer = await asyncio.open_connection("127.0.0.1", offer["port"])
        writer.write(b"0" * len(offer["ticket"]))
        assert await reader.read() == b""
        writer.close()
        offer = await peer.dask_context_stream(token=token, path="weights/config.json")
        reader, writer = await asyncio.open_connection("127.0.0.1", offer["port"])
        writer.write(offer["ticket"].encode())
        assert await reader.read() == b'{"layers": 2}'
        writer.close()
        assert await peer.dask_context_manifest(token="0" * 40) is None


# ---------------------------------------------------------------- a real model
@gen_cluster(client=True, nthreads=[], timeout=60)
async def test_a_model_loads_with_from_pretrained_from_its_staged_copy(c, s, tmp_path, model_dir):
    await dc.register(c, ContextSpec("lm", load_causal_lm, files=model_dir))
    async with on_node(s, tmp_path, "n1") as a, on_node(s, tmp_path, "n2") as b:
        first = await c.submit(next_token, "lm", workers=[a.address], pure=False)
        second = await c.submit(next_token, "lm", workers=[b.address], pure=False)
        staged = await worker_events(c, "staged", 2)
    assert [e["origin"] for e in staged] == ["files", "peer"]
    assert first == second
