"""Loaders and task functions shared by the tests.

They live in an importable module (not in test files) because process workers
unpickle them by reference.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dask_context


def blob(name: str, nbytes: int = 1000, seconds: float = 0.0) -> dict:
    """A context of ``nbytes`` bytes that takes ``seconds`` to load."""
    time.sleep(seconds)
    return {"name": name, "data": bytearray(nbytes), "pid": os.getpid()}


def broken(message: str = "weights file is corrupt") -> dict:
    raise OSError(message)


def use_context(x: int, name: str, seconds: float = 0.0) -> tuple[str, int, int]:
    """Task: touch context ``name``; return (context, x, worker pid)."""
    ctx = dask_context.get_context(name)
    if seconds:
        time.sleep(seconds)
    return ctx["name"], x, os.getpid()


def load_every_time(x: int, seconds: float) -> tuple[int, int]:
    """Task of the load-per-task baseline: pays the load on every call."""
    blob("baseline", seconds=seconds)
    return x, os.getpid()


def where(x: int, name: str, seconds: float = 0.0) -> tuple[int, str]:
    """Task: touch context ``name``; return (x, worker address)."""
    from distributed import get_worker

    dask_context.get_context(name)
    if seconds:
        time.sleep(seconds)
    return x, get_worker().address


def fails_on(bad: list, nbytes: int = 1000, seconds: float = 0.0) -> dict:
    """A context whose load fails on the workers named in ``bad`` (a node with a
    missing file or driver) and works elsewhere."""
    from distributed import get_worker

    worker = get_worker()
    if worker.name in bad or worker.address in bad:
        raise FileNotFoundError(f"/models/weights.bin is missing on {worker.address}")
    return blob("ok", nbytes=nbytes, seconds=seconds)


def fails_slowly_on(slow: list, seconds: float) -> dict:
    """A context whose load always fails: after ``seconds`` on the workers named in
    ``slow``, at once elsewhere."""
    from distributed import get_worker

    if get_worker().address in slow:
        time.sleep(seconds)
    raise OSError("weights file is corrupt")


def kills_its_worker(on: list | None = None, seconds: float = 0.2) -> dict:
    """A context whose load kills the worker process (out of memory, a crash in
    native code) on the workers named in ``on`` (every worker if None)."""
    from distributed import get_worker

    worker = get_worker()
    time.sleep(seconds)
    if on is None or worker.name in on:
        os._exit(1)
    return blob("survivor")


def outgrows_its_worker(mib: int = 2048, step: int = 32, seconds: float = 0.05) -> dict:
    """A context that keeps growing, ``step`` MiB every ``seconds``, to ``mib`` MiB:
    weights too large for the worker's memory limit, read bit by bit."""
    chunks = []
    for _ in range(mib // step):
        chunks.append(b"\x01" * (step << 20))  # written, so resident
        time.sleep(seconds)
    return {"chunks": chunks}


def fails_first_time(marker: str, seconds: float = 0.0) -> dict:
    """A context whose very first load (across all workers) fails, then works."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return blob("flaky", seconds=seconds)
    os.close(fd)
    raise ConnectionError("the model server hiccuped")


def always_fails(message: str = "CUDA driver not found") -> dict:
    raise RuntimeError(message)


def verify_slowly(claims: list, seconds: float, context: str = "verifier") -> list:
    """Task: verdicts from the warm model, plus ``seconds`` of other work."""
    from dask_context.factcheck import verify

    out = verify(claims, context)
    time.sleep(seconds)
    return out


def logged_blob(name: str, log: str, nbytes: int = 1000, seconds: float = 0.0) -> dict:
    """:func:`blob` that appends ``name start end`` (monotonic seconds) to ``log``."""
    start = time.monotonic()
    out = blob(name, nbytes=nbytes, seconds=seconds)
    with open(log, "a") as f:
        f.write(f"{name} {start} {time.monotonic()}\n")
    return out


def verdict_columns(part: Any, context: str = "verifier") -> Any:
    """DataFrame task: the claims of a partition with the warm model's verdicts."""
    from dask_context.factcheck import verify

    out = verify(list(part["claim"]), context)
    return part.assign(verdict=[v["verdict"] for v in out], logprob=[v["logprob"] for v in out])


def tag_with_context(value: int, name: str) -> str:
    """Row task (``Series.apply``): the value, tagged with context ``name``'s name."""
    return f"{dask_context.get_context(name)['name']}:{value}"


def fan_out(x: int, name: str, how: str) -> list:
    """Context task that submits context tasks from inside and waits for them,
    leaving its thread (``worker_client``, or ``secede`` and ``rejoin``)."""
    from distributed import get_client, rejoin, secede, worker_client

    dask_context.get_context(name)
    if how == "worker_client":
        with worker_client() as client, dask_context.use(name):
            return [r[1] for r in client.gather(client.map(use_context, [x, x + 1], name=name))]
    client = get_client()
    with dask_context.use(name):
        futures = client.map(use_context, [x, x + 1], name=name)
    secede()
    out = [r[1] for r in client.gather(futures)]
    rejoin()
    return out


def built_on(name: str, other: str) -> dict:
    """A context whose loader uses context ``other`` (a model and its tokenizer)."""
    return {**blob(name), "built on": dask_context.get_context(other)["name"]}
