"""Loaders and task functions shared by the tests.

They live in an importable module (not in test files) because process workers
unpickle them by reference.
"""

from __future__ import annotations

import os
import time

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
