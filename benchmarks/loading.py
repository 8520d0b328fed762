"""How every arm loads a model, and the log that counts loads the same way for all.

A load here is :func:`dask_context.models.load_causal_lm` on a generated checkpoint,
preceded by a *cold* read of the checkpoint files: they are dropped from the page
cache and read back at a bounded bandwidth, as a node reading weights from a shared
filesystem does (the papers' setting). Without that, a load on this machine is a
few tens of milliseconds: safetensors maps the file lazily and the page cache holds
it after the first read, so the load would cost nothing and no cost regime of the
papers could appear. The model is loaded in bfloat16, which makes the loader really
read and convert every weight (as a copy to a GPU would) and is also the faster
dtype for inference on this CPU (AVX512-BF16).

Each load appends two JSON lines (``start`` and ``done``) to a log file shared by the
processes of one benchmark run; :func:`read_load_log` counts them. This is how loads
are counted for load-per-task, the global cache, dask-context and Ray alike.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

CHUNK = 8 << 20
"""Bytes read per ``os.readv`` call of a cold read."""


def checkpoint_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files of a checkpoint directory, largest first."""
    files = [p for p in Path(path).iterdir() if p.is_file()]
    return sorted(files, key=lambda p: -p.stat().st_size)


def checkpoint_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a checkpoint directory on disk."""
    return sum(p.stat().st_size for p in checkpoint_files(path))


def cold_read(path: str | os.PathLike[str], mbps: float = 0.0) -> tuple[int, float]:
    """Drop a checkpoint from the page cache, then read it back from disk.

    Parameters
    ----------
    path
        Checkpoint directory.
    mbps
        Storage bandwidth to emulate, in MB/s (10**6 bytes); 0 reads at the speed
        of the local disk.

    Returns
    -------
    Bytes read and seconds taken.

    Notes
    -----
    ``POSIX_FADV_DONTNEED`` only drops pages that no process maps, so a checkpoint
    mapped elsewhere is partly read from memory; the bandwidth bound still holds.
    """
    start = time.perf_counter()
    buf = bytearray(CHUNK)
    total = 0
    for file in checkpoint_files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while n := os.readv(fd, [buf]):
                total += n
                if mbps > 0:
                    # sleep until the bytes read so far fit the bandwidth
                    ahead = total / (mbps * 1e6) - (time.perf_counter() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        finally:
            os.close(fd)
    return total, time.perf_counter() - start


def load_model(
    path: str,
    *,
    dtype: str = "bfloat16",
    storage_mbps: float = 0.0,
    log: str | None = None,
    device: str = "cpu",
    cold: bool = True,
) -> Any:
    """Load a generated checkpoint the way every arm of the benchmark does.

    Parameters
    ----------
    path
        Checkpoint directory written by :func:`dask_context.models.make_model`.
    dtype
        torch dtype name the weights are converted to.
    storage_mbps
        Bandwidth of the cold read (see :func:`cold_read`).
    log
        File to append ``start``/``done`` records to (None: no record).
    device
        Where the model goes; dask-context passes the worker's device.
    cold
        Drop the checkpoint from the page cache and read it back first
        (:func:`cold_read`); False loads it as it is (a copy this node just made).

    Returns
    -------
    A :class:`dask_context.models.LanguageModel`.
    """
    from dask_context.models import load_causal_lm

    record: dict[str, Any] = {"pid": os.getpid(), "model": Path(path).name, "start": time.time()}
    append_record(log, {**record, "event": "start"})
    t0 = time.perf_counter()
    nbytes, read_seconds = cold_read(path, storage_mbps) if cold else (checkpoint_bytes(path), 0.0)
    model = load_causal_lm(path, device=device, dtype=dtype)
    seconds = time.perf_counter() - t0
    append_record(
        log,
        {**record, "event": "done", "seconds": seconds, "read_seconds": read_seconds, "bytes": nbytes},
    )
    return model


def load_staged(path: str, *, source: str, storage_mbps: float = 0.0, **load: Any) -> Any:
    """Loader of a context with ``files=source``: load the copy dask-context staged.

    The staging read ``source`` from the storage (or fetched a peer's copy) into a
    node-local directory, ``path``, moments before; this loads that copy as it is,
    from the page cache the copy was written through, as a loader on a node that
    just staged it does (the read from the storage, or the transfer, was the
    staging's and is timed there). Only when the staging could not make a copy and
    hands over ``source`` itself is the read cold and bounded by the storage's
    bandwidth, as for every other arm.

    Parameters
    ----------
    path
        The directory dask-context passes to the loader.
    source
        The checkpoint directory on the (emulated) shared storage.
    storage_mbps
        Bandwidth of a read of ``source`` (see :func:`cold_read`).
    **load
        The other arguments of :func:`load_model`.
    """
    if os.path.samefile(path, source):
        return load_model(path, storage_mbps=storage_mbps, **load)
    return load_model(path, cold=False, **load)


def append_record(log: str | None, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to the file ``log`` (nothing if None)."""
    if log is None:
        return
    # one short O_APPEND write per record: lines from concurrent processes stay whole
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_load_log(log: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise a load log.

    Returns
    -------
    ``{"loads": started loads, "completed": finished loads, "seconds": mean seconds of
    a finished load (None if none), "per_model": {model: started loads}, "first_start":
    wall-clock time the first load started (None if none), "spans": (pid, start, stop)
    of each finished load}``.

    Examples
    --------
    >>> import tempfile
    >>> log = tempfile.mktemp()
    >>> append_record(log, {"event": "start", "model": "m0", "start": 10.0})
    >>> append_record(log, {"event": "done", "model": "m0", "start": 10.0, "seconds": 2.0})
    >>> append_record(log, {"event": "start", "model": "m1", "start": 11.0})
    >>> read_load_log(log)
    {'loads': 2, 'completed': 1, 'seconds': 2.0, 'total_seconds': 2.0, 'per_model': {'m0': 1, 'm1': 1}, 'first_start': 10.0, 'spans': [(None, 10.0, 12.0)]}
    """
    path = Path(log)
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    starts = [r for r in records if r["event"] == "start"]
    done = [r["seconds"] for r in records if r["event"] == "done"]
    per_model: dict[str, int] = {}
    for r in starts:
        per_model[r["model"]] = per_model.get(r["model"], 0) + 1
    return {
        "loads": len(starts),
        "completed": len(done),
        "seconds": sum(done) / len(done) if done else None,
        "total_seconds": sum(done),
        "per_model": per_model,
        "first_start": min((r["start"] for r in starts), default=None),
        "spans": [(r.get("pid"), r["start"], r["start"] + r["seconds"]) for r in records if r["event"] == "done"],
    }
