"""Scenario ``coldstart``: N workers start cold at once against shared storage.

N worker processes (4 by default), each emulating a node of its own (its own
``dask-context.worker.node`` and staging directory), become cold together: an eager
context is registered, so every worker loads the model at once. The checkpoint lives
on an emulated shared filesystem of fixed total bandwidth ``B``: every read of it,
from any process, draws on one bandwidth (:class:`SharedStorage`), so N concurrent
readers get about ``B/N`` each, as nodes reading weights from a shared filesystem do.

Two arms:

- ``filesystem``: the loader reads the checkpoint from the shared storage on every
  worker (no ``files=``): what happens without peer bootstrap;
- ``peer bootstrap``: the spec has ``files=checkpoint``; one worker copies it from the
  shared storage into its node's staging directory, the others fetch that copy from
  its worker (streamed with ``sendfile``, :mod:`dask_context.staging`) and load from it.

Measured: seconds from registration until every worker holds the model ("all
warm", from the workers' ``loaded`` events), and the bytes read from the shared
storage and moved between peers. The bounds no implementation can beat, with ``S``
the checkpoint's size and ``l`` a load from a local, page-cached copy:

- filesystem: ``N·S/B + l`` (the storage delivers N copies, then the last loads);
- peer bootstrap: ``S/B + l`` (one copy from the storage; peers infinitely fast).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import glob
import logging
import multiprocessing
import os
import shutil
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import psutil
from distributed import Client, Nanny, Scheduler, SpecCluster, WorkerPlugin

import dask_context
from benchmarks.loading import CHUNK, checkpoint_bytes, checkpoint_files
from benchmarks.runner import wait_ready
from benchmarks.tasks import Warmup
from dask_context import staging
from dask_context.models import load_causal_lm
from dask_context.staging import Stager

logger = logging.getLogger(__name__)

NAME = "coldstart"
WORKERS = 4
ARMS = ("filesystem", "peer bootstrap")
NOTE = (
    "The cold-start scenario emulates its nodes on this machine: the peer copies of every "
    "node (sending with sendfile; receiving, CRC-32 checking and writing each byte) share "
    "its cores, memory and disk, which real nodes do in parallel; the filesystem arm mostly "
    "waits on the emulated storage, which takes no CPU."
)


class SharedStorage:
    """An emulated shared filesystem: reads through it, from any process, share one bandwidth.

    The state is a small file holding when the storage is next free and the bytes it
    delivered. A read of ``n`` bytes takes, under an exclusive lock on that file, the
    next ``n / B`` seconds of the storage's time (queueing behind the reads granted
    before it) and sleeps until they are over: concurrent readers interleave their
    chunks and each gets ``B / readers``.

    Parameters
    ----------
    state
        The state file (created on first use).
    mbps
        Total bandwidth ``B`` in MB/s (10**6 bytes); 0 delivers at once (and still
        counts the bytes).

    Examples
    --------
    >>> import tempfile
    >>> storage = SharedStorage(tempfile.mktemp(), mbps=10)
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     _ = f.write(bytes(10**6)); f.flush()
    ...     start = time.time()
    ...     nbytes = sum(map(len, storage.read(f.name)))
    ...     seconds = time.time() - start
    >>> nbytes, storage.delivered(), seconds >= 0.1
    (1000000, 1000000, True)
    """

    def __init__(self, state: str, mbps: float):
        self.state = state
        self.mbps = mbps

    def read(self, path: str) -> Iterator[bytes]:
        """The bytes of file ``path``, in chunks, each once the storage delivered it."""
        with open(path, "rb") as f:
            while data := f.read(CHUNK):
                time.sleep(max(0.0, self._take(len(data)) - time.time()))
                yield data

    def read_tree(self, path: str) -> int:
        """Read every file of the checkpoint directory ``path``; return the bytes read."""
        return sum(len(data) for file in checkpoint_files(path) for data in self.read(str(file)))

    def delivered(self) -> int:
        """Bytes delivered so far, by all readers."""
        with self._locked() as fd:
            return self._load(fd)[1]

    def _take(self, nbytes: int) -> float:
        """Book ``nbytes`` of transfer; return the wall-clock time it ends."""
        with self._locked() as fd:
            free_at, delivered = self._load(fd)
            end = max(free_at, time.time()) + (nbytes / (self.mbps * 1e6) if self.mbps > 0 else 0.0)
            os.pwrite(fd, f"{end:.6f} {delivered + nbytes}\n".ljust(48).encode(), 0)
        return end

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        fd = os.open(self.state, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    @staticmethod
    def _load(fd: int) -> tuple[float, int]:
        fields = os.pread(fd, 48, 0).split()
        return (float(fields[0]), int(fields[1])) if fields else (0.0, 0)


class StagingReadsSharedStorage(WorkerPlugin):
    """Route the staging's reads of ``files`` (:meth:`Stager.read_source`) through
    the shared storage, in every worker process."""

    name = "benchmark-shared-storage"

    def __init__(self, storage: SharedStorage):
        self.storage = storage

    def setup(self, worker: Any) -> None:
        storage = self.storage

        def read_source(stager: Stager, path: str) -> Iterator[bytes]:
            return storage.read(path)

        Stager.read_source = read_source  # type: ignore[method-assign]


def load_from_storage(path: str, storage: SharedStorage, dtype: str, device: str = "cpu") -> Any:
    """Loader of the filesystem arm: read the checkpoint from the shared storage, then load it."""
    storage.read_tree(path)
    return load_causal_lm(path, device=device, dtype=dtype)


def _process_cpu() -> float:
    """CPU seconds of this process so far (run on the workers)."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _cpu_seconds(client: Client) -> float:
    return sum(client.run(_process_cpu).values())


def time_local_load(path: str, dtype: str, repeats: int = 3) -> float:
    """Task: median seconds of ``load_causal_lm`` from a local, page-cached checkpoint."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_causal_lm(path, dtype=dtype)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@contextlib.contextmanager
def node_cluster(workers: int, threads: int, root: Path) -> Iterator[Client]:
    """A cluster of ``workers`` single-threaded worker processes, each its own node
    (node name and staging directory), with torch and transformers imported."""
    specs = {}
    for i in range(workers):
        settings = copy.deepcopy(dask.config.get("dask-context"))
        settings["worker"].update(node=f"node{i}", **{"staging-dir": str(root / f"node{i}")})
        specs[f"node{i}"] = {"cls": Nanny, "options": {
            "nthreads": 1, "config": {"dask-context": settings}, "silence_logs": logging.ERROR,
        }}
    cluster = SpecCluster(
        workers=specs, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
        silence_logs=logging.ERROR,
    )
    with cluster, Client(cluster) as client:
        client.register_plugin(Warmup(threads))
        wait_ready(client, workers)
        yield client


def run_arm(client: Client, spec: dask_context.ContextSpec, storage: SharedStorage,
            workers: int, timeout: float) -> dict[str, Any]:
    """Register the eager ``spec`` and wait until every worker loaded it.

    Returns
    -------
    ``all_warm`` (seconds), ``shared_bytes`` (read from the shared storage),
    ``peer_bytes`` (fetched from peers), ``origins`` (where each staged copy came from),
    ``copy_seconds`` (median seconds a worker took to stage its copy, per origin),
    ``worker_cpu`` (CPU seconds the worker processes spent until all were warm).
    """
    before, cpu = storage.delivered(), _cpu_seconds(client)
    t0 = time.time()
    dask_context.register(client, spec)
    deadline = time.monotonic() + timeout
    while True:
        events = [(t, m) for t, m in client.get_events("dask-context") if m.get("context") == spec.name]
        loaded = {m["worker"]: t for t, m in events if m["action"] == "loaded"}
        failed = [m.get("error") for _, m in events if m["action"] == "failed"]
        if len(loaded) >= workers or failed or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    cpu = _cpu_seconds(client) - cpu
    staged = [m for _, m in events if m["action"] == "staged"]
    dask_context.unregister(client, spec.name)
    out: dict[str, Any] = {
        "shared_bytes": storage.delivered() - before,
        "peer_bytes": sum(m["nbytes"] for m in staged if m["origin"] == "peer"),
        "origins": sorted(m["origin"] for m in staged),
        "copy_seconds": {
            o: statistics.median(m["seconds"] for m in staged if m["origin"] == o)
            for o in {m["origin"] for m in staged}
        },
        "staged": [{k: m.get(k) for k in ("worker", "origin", "peer", "nbytes", "seconds")} for m in staged],
        "loaded": {w: t - t0 for w, t in loaded.items()},
        "worker_cpu": cpu,
        "status": "ok",
    }
    if failed or len(loaded) < workers:
        out["status"] = f"load failed: {failed[0]}" if failed else f"{len(loaded)} of {workers} warm after {timeout:.0f} s"
    else:
        out["all_warm"] = max(loaded.values()) - t0
    return out


def measure(path: str, *, tmp: Path, mbps: float, dtype: str, threads: int = 1,
            workers: int = WORKERS) -> list[dict[str, Any]]:
    """Both arms on one cluster of ``workers`` nodes; one row per arm."""
    size = checkpoint_bytes(path)
    storage = SharedStorage(str(tmp / "shared-storage"), mbps)
    transfer = size / (mbps * 1e6)
    with node_cluster(workers, threads, tmp / "nodes") as client:
        client.register_plugin(StagingReadsSharedStorage(storage))
        # on each worker in turn: its first load pays lazy imports, and loads at once
        # would measure the contention of the 2 cores instead
        local = statistics.median(
            client.submit(time_local_load, path, dtype, workers=[w], pure=False).result()
            for w in sorted(client.scheduler_info(n_workers=-1)["workers"])
        )
        logger.info("Cold start: %d workers, %.0f MB at %g MB/s shared, local load %.2f s",
                    workers, size / 1e6, mbps, local)
        specs = {
            "filesystem": dask_context.ContextSpec(
                "coldstart-fs", load_from_storage, args=[path],
                kwargs={"storage": storage, "dtype": dtype}, eager=True,
            ),
            "peer bootstrap": dask_context.ContextSpec(
                "coldstart-peer", load_causal_lm, kwargs={"dtype": dtype}, files=path, eager=True,
            ),
        }
        bounds = {"filesystem": workers * transfer + local, "peer bootstrap": transfer + local}
        rows = []
        for arm in ARMS:
            measured = run_arm(client, specs[arm], storage, workers, timeout=120 + 10 * workers * transfer)
            wall = measured.get("all_warm")
            rows.append({
                "scenario": NAME, "arm": arm, "workers": workers, "mbps": mbps,
                "checkpoint_bytes": size, "local_load": local, "bound": bounds[arm],
                "x_bound": wall / bounds[arm] if wall else None, "all_warm": wall, **measured,
            })
            logger.info("Cold start, %s: all %d warm after %s s (bound %.2f s), %.0f MB from the shared storage",
                        arm, workers, f"{wall:.2f}" if wall else "-", bounds[arm], measured["shared_bytes"] / 1e6)
    return rows


# ---------------------------------------------------------------- one peer copy's CPU
def list_files(path: str) -> list[str]:
    """Loader of the peer-copy measurement: the files of the staged copy (nothing read)."""
    return sorted(os.listdir(path))


def _send_copies(path: str, port: int, times: int) -> None:
    """Send the file ``path`` ``times`` times, each over a new connection to ``port``,
    with the staging's own sender (``sendfile``)."""
    for _ in range(times):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            staging._send_file(conn, path)


def measure_receive(size: int, *, tmp: Path, repeats: int = 3) -> dict[str, Any]:
    """CPU seconds per GB of the receiving side of a peer copy alone, without Dask.

    Another process sends a file of ``size`` random bytes with the staging's sender
    (``sendfile``); this one receives it with the staging's receiver (into one reused
    buffer, CRC-32, written into a file allocated up front) and takes its own CPU
    (user and system, from ``psutil``) around it. ``repeats`` copies each way:

    - ``recycled``: each copy removed before the next, so the page cache takes the
      memory the last one freed;
    - ``fresh``: every copy kept, so every page of it is memory the machine had not
      used since it freed it. On a virtual machine whose host takes freed guest memory
      back, first touching it costs system time: any reader of the file pays that
      (a load from the shared filesystem too), not only a peer copy.
    """
    folder = tmp / "receive"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "model.bin"
    with open(source, "wb") as f:
        block = os.urandom(64 << 20)
        for offset in range(0, size, len(block)):
            f.write(block[: min(len(block), size - offset)])
    out: dict[str, Any] = {"bytes": size}
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = multiprocessing.get_context("spawn").Process(
            target=_send_copies, args=(str(source), server.getsockname()[1], 2 * repeats))
        sender.start()
        try:
            for mode in ("recycled", "fresh"):
                samples = []
                for i in range(repeats):
                    conn, _ = server.accept()
                    target = folder / f"{mode}-{i}" / "model.bin"
                    before, start = psutil.Process().cpu_times(), time.perf_counter()
                    with conn:
                        staging._write(str(target), staging._received(conn, size, "the copy"), expect=size)
                    after, wall = psutil.Process().cpu_times(), time.perf_counter() - start
                    samples.append({"wall": wall, "user": after.user - before.user,
                                    "system": after.system - before.system})
                    if mode == "recycled":
                        shutil.rmtree(target.parent)
                med = {k: statistics.median(x[k] for x in samples) for k in ("wall", "user", "system")}
                out[mode] = {"samples": samples, **med,
                             "cpu_per_gb": (med["user"] + med["system"]) / (size / 1e9)}
        finally:
            sender.join(timeout=60)
    return out


def measure_peer_copy(size: int, *, tmp: Path, repeats: int = 3, follow: bool = False) -> dict[str, Any]:
    """CPU seconds per GB of one peer copy, on the sending and the receiving worker.

    Two worker processes, each its own node; a directory holding one file of ``size``
    random bytes is staged on the first (from ``files``, unthrottled), then, ``repeats``
    times, on the second from the first (the copy is removed between repeats). The
    CPU of each process (user + system, from ``psutil``) is taken just before and
    after each peer copy; the file is in the page cache on both sides.

    With ``follow``, the second worker follows the first one's copy from ``files``
    while it is made: each repeat stages on the first worker alone once (its CPU
    for the copy from ``files``), then on both at once; the sender's CPU of a
    followed copy is the difference (what serving the follower cost it).
    """
    source = tmp / "peer-copy" / "weights"
    source.mkdir(parents=True, exist_ok=True)
    with open(source / "model.bin", "wb") as f:
        block = os.urandom(64 << 20)
        for offset in range(0, size, len(block)):
            f.write(block[: min(len(block), size - offset)])
    samples = []
    with node_cluster(2, 1, tmp / "peer-copy-nodes") as client:
        sender, receiver = sorted(client.scheduler_info(n_workers=-1)["workers"])
        for i in range(repeats + 1):
            spec = dask_context.ContextSpec(f"peer-copy-{i}", list_files, files=str(source))
            dask_context.register(client, spec)
            if i == 0:
                client.submit(dask_context.get_context, spec.name, workers=[sender], pure=False).result()
                dask_context.unregister(client, spec.name)
                while glob.glob(str(tmp / "peer-copy-nodes" / "*" / spec.token)):
                    time.sleep(0.05)
                continue
            source_cpu = 0.0
            if follow:
                before = client.run(_process_cpu)
                client.submit(dask_context.get_context, spec.name, workers=[sender], pure=False).result()
                source_cpu = client.run(_process_cpu)[sender] - before[sender]
                dask_context.unregister(client, spec.name)
                while glob.glob(str(tmp / "peer-copy-nodes" / "*" / spec.token)):
                    time.sleep(0.05)
                dask_context.register(client, spec)
                before = client.run(_process_cpu)
                start = time.perf_counter()
                first = client.submit(dask_context.get_context, spec.name, workers=[sender], pure=False)
                # the sender has the turn at the source before the receiver asks
                topic = staging.COPYING.format(token=spec.token)
                while not any(m.get("worker") == sender for _, m in client.get_events(topic)):
                    time.sleep(0.01)
                client.submit(dask_context.get_context, spec.name, workers=[receiver], pure=False).result()
                first.result()
            else:
                # the sender's copy of this spec, from the sender's node (a local copy, no peer)
                client.submit(dask_context.get_context, spec.name, workers=[sender], pure=False).result()
                before = client.run(_process_cpu)
                start = time.perf_counter()
                client.submit(dask_context.get_context, spec.name, workers=[receiver], pure=False).result()
            wall = time.perf_counter() - start
            after = client.run(_process_cpu)
            staged = [m for _, m in client.get_events("dask-context")
                      if m.get("action") == "staged" and m.get("context") == spec.name and m.get("origin") == "peer"]
            dask_context.unregister(client, spec.name)
            # both copies are removed before the next copy is measured
            while glob.glob(str(tmp / "peer-copy-nodes" / "*" / spec.token)):
                time.sleep(0.05)
            samples.append({
                "wall": wall, "copy_seconds": staged[0]["seconds"] if staged else None,
                "sender_cpu": after[sender] - before[sender] - source_cpu,
                "receiver_cpu": after[receiver] - before[receiver], "source_cpu": source_cpu,
                "origin": "peer" if staged else "?",
            })
    gb = size / 1e9
    med = {k: statistics.median(s[k] for s in samples) for k in ("wall", "sender_cpu", "receiver_cpu")}
    return {
        "bytes": size, "samples": samples, "wall": med["wall"],
        "sender_cpu_per_gb": med["sender_cpu"] / gb, "receiver_cpu_per_gb": med["receiver_cpu"] / gb,
        "gb_per_cpu_second": gb / (med["sender_cpu"] + med["receiver_cpu"]),
        "gb_per_cpu_second_receiver": gb / med["receiver_cpu"],
        "gb_per_cpu_second_sender": gb / med["sender_cpu"],
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import tempfile

    p = argparse.ArgumentParser(prog="python -m benchmarks.coldstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-copy", type=float, default=None, metavar="GB",
                   help="only measure the CPU of one peer copy of a file of GB gigabytes between two workers")
    p.add_argument("--receive", type=float, default=None, metavar="GB",
                   help="only measure the CPU of receiving one peer copy of GB gigabytes, without Dask")
    p.add_argument("--repeats", type=int, default=3, help="peer copies measured (--peer-copy, --receive)")
    p.add_argument("--follow", action="store_true",
                   help="with --peer-copy: the receiver follows the sender's copy from files as it is made")
    p.add_argument("--preset", default="bench", help="make_model preset of the checkpoint (cold-start scenario)")
    p.add_argument("--cache", type=Path, default=Path(__file__).resolve().parents[1] / ".dask-context-cache" / "benchmarks",
                   help="where the generated checkpoint is kept")
    p.add_argument("--mbps", type=float, default=300.0, help="bandwidth of the shared storage, MB/s")
    p.add_argument("--workers", type=int, default=WORKERS, help="worker processes, one node each")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="dask-context-coldstart-") as tmp:
        if args.receive is not None:
            out = measure_receive(int(args.receive * 1e9), tmp=Path(tmp), repeats=args.repeats)
            for mode in ("recycled", "fresh"):
                m = out[mode]
                print(f"receive into {mode} memory: {m['wall']:.2f} s wall, user {m['user']:.2f} + system "
                      f"{m['system']:.2f} CPU-s: {m['cpu_per_gb']:.2f} CPU-s/GB, "
                      f"{1 / m['cpu_per_gb']:.2f} GB per CPU-second (a 25 Gb/s link: 3.1 GB/s)")
        elif args.peer_copy is not None:
            out: Any = measure_peer_copy(int(args.peer_copy * 1e9), tmp=Path(tmp), repeats=args.repeats,
                                         follow=args.follow)
            for s in out["samples"]:
                print(f"peer copy ({s['origin']}): {s['wall']:.2f} s wall, sender {s['sender_cpu']:.2f} CPU-s, "
                      f"receiver {s['receiver_cpu']:.2f} CPU-s")
            print(f"{out['bytes'] / 1e9:.2f} GB: sender {out['sender_cpu_per_gb']:.2f} CPU-s/GB, receiver "
                  f"{out['receiver_cpu_per_gb']:.2f} CPU-s/GB; {out['gb_per_cpu_second_receiver']:.2f} GB per "
                  f"receiver CPU-second, {out['gb_per_cpu_second_sender']:.2f} per sender CPU-second "
                  f"(a 25 Gb/s link: 3.1 GB/s)")
        else:
            from dask_context.models import make_model

            path = str(make_model(args.cache / f"{args.preset}-seed0", preset=args.preset, seed=0))
            out = measure(path, tmp=Path(tmp), mbps=args.mbps, dtype=args.dtype, workers=args.workers)
            print(f"{'arm':<16} {'all warm':>9} {'bound':>7} {'storage MB':>11} {'peer MB':>8} {'worker CPU':>11}")
            for r in out:
                warm = f"{r['all_warm']:.2f}" if r.get("all_warm") else r["status"]
                print(f"{r['arm']:<16} {warm:>9} {r['bound']:>7.2f} {r['shared_bytes'] / 1e6:>11.0f} "
                      f"{r['peer_bytes'] / 1e6:>8.0f} {r['worker_cpu']:>11.2f}")
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
