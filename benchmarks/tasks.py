"""Task functions of the plain-Dask arms, and the worker warm-up they all share.

dask-context's arm runs :func:`dask_context.factcheck.verify`; the functions here are
the two baselines it is compared with:

- :func:`load_per_task`: no context reuse, every task loads the model;
- :func:`cached_judge`: the plain-Dask idiom, a module-level lazy cache in each
  worker process, bounded to ``capacity`` models (least recently used goes).

They live in a module (not in ``run.py``) because worker processes unpickle them by
reference. So do the benchmark's worker plugins: :class:`Warmup`,
:class:`NodePerProcess` and :class:`TaskStarts`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
from distributed import WorkerPlugin

from benchmarks.loading import append_record, load_model
from dask_context.factcheck import judge

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

Verdicts = list[dict[str, Any]]


def load_per_task(claims: list[str], path: str, load: dict[str, Any]) -> Verdicts:
    """Baseline without reuse: load the model, judge ``claims``, drop the model."""
    model = load_model(path, **load)
    try:
        return judge(model, list(claims))
    finally:
        del model
        gc.collect()


_CACHE: OrderedDict[str, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def cached_judge(claims: list[str], path: str, load: dict[str, Any], capacity: int = 1) -> Verdicts:
    """The global-cache idiom: load lazily into a module global, keep ``capacity`` models.

    This is what Dask users write by hand: no routing, so a task lands on whatever
    worker is free and loads the model there if that worker lacks it. With several
    models and ``capacity=1`` (a memory budget of one model), a worker evicts its
    model whenever a task for another model lands on it.
    """
    with _CACHE_LOCK:
        model = _CACHE.get(path)
        if model is None:
            while len(_CACHE) >= capacity:
                _CACHE.popitem(last=False)
                gc.collect()  # free the evicted weights before loading the next ones
            model = load_model(path, **load)
            _CACHE[path] = model
        _CACHE.move_to_end(path)
    return judge(model, list(claims))


def clear_cache() -> int:
    """Empty this worker's global cache (between benchmark arms); return how many it held."""
    with _CACHE_LOCK:
        n = len(_CACHE)
        _CACHE.clear()
    gc.collect()
    return n


def vote(*answers: Verdicts) -> Verdicts:
    """Majority verdict per claim over the models of a pipeline (ties: first model)."""
    out = []
    for rows in zip(*answers, strict=True):
        counts = Counter(r["verdict"] for r in rows)
        best = max(counts.values())
        verdict = next(r["verdict"] for r in rows if counts[r["verdict"]] == best)
        out.append({"claim": rows[0]["claim"], "verdict": verdict, "votes": [r["verdict"] for r in rows]})
    return out


_READY = threading.Event()


def _warm(threads: int) -> None:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    torch.set_num_threads(threads)
    _READY.set()


class Warmup(WorkerPlugin):
    """Import torch and transformers and set torch's threads on every worker.

    Every Dask arm gets workers that already paid these imports (about 3 to 8 s
    here), as long-lived workers of a real deployment have. Replacement workers
    after a preemption pay them again, as they would.

    Parameters
    ----------
    threads
        torch intra-op threads per worker.
    """

    name = "benchmark-warmup"

    def __init__(self, threads: int = 1):
        self.threads = threads

    async def setup(self, worker: Worker) -> None:
        # in a thread: the imports take seconds and the event loop must keep serving
        await asyncio.to_thread(_warm, self.threads)


async def wait_warm(timeout: float = 120.0) -> bool:
    """Run on workers (``client.run``): wait until :class:`Warmup` finished here."""
    return await asyncio.to_thread(_READY.wait, timeout)


class NodePerProcess(WorkerPlugin):
    """Make every worker process a node of its own, for dask-context's staging.

    Sets ``dask-context.worker.node`` (``node-<pid>``) and
    ``dask-context.worker.staging-dir`` (``<root>/node-<pid>``, empty) in each worker
    process before dask-context sets up there (plugins are set up in the order they
    were registered; register this one before any context). A worker that replaces a
    preempted one is then a new node with an empty staging directory, as on a batch
    system, where the preempted node goes back to the pool with its local disk. Only
    contexts with ``files=`` read these settings.

    Parameters
    ----------
    root
        Directory holding every emulated node's staging directory.
    """

    name = "benchmark-node-per-process"

    def __init__(self, root: str):
        self.root = root

    def setup(self, worker: Worker) -> None:
        node = f"node-{os.getpid()}"
        dask.config.set({
            "dask-context.worker.node": node,
            "dask-context.worker.staging-dir": os.path.join(self.root, node),
        })


class TaskStarts(WorkerPlugin):
    """Append every task a worker starts (key, process) to a file.

    A task that a killed worker was running never reaches the scheduler's task
    stream; its start, written here before it runs, survives the process. See
    :func:`read_task_starts`.

    Parameters
    ----------
    log
        The file (shared by the worker processes; one short append per start).
    """

    name = "benchmark-task-starts"

    def __init__(self, log: str):
        self.log = log

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish == "executing":
            append_record(self.log, {"key": str(key), "pid": os.getpid()})


def read_task_starts(log: str | os.PathLike[str]) -> dict[str, int]:
    """Count the tasks started and run again in a :class:`TaskStarts` log.

    A task runs again only on another process (its first one died, or left while
    running it), so a task started by ``n`` processes ran ``n - 1`` more times.

    Returns
    -------
    ``{"tasks": tasks started, "reruns": starts beyond each task's first,
    "rerun_tasks": tasks started more than once}``.

    Examples
    --------
    >>> import tempfile
    >>> log = tempfile.mktemp()
    >>> for key, pid in [("a", 1), ("b", 1), ("b", 2), ("c", 2)]:
    ...     append_record(log, {"key": key, "pid": pid})
    >>> read_task_starts(log)
    {'tasks': 3, 'reruns': 1, 'rerun_tasks': 1}
    """
    path = Path(log)
    procs: defaultdict[str, set[int]] = defaultdict(set)
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        procs[record["key"]].add(record["pid"])
    return {
        "tasks": len(procs),
        "reruns": sum(len(p) - 1 for p in procs.values()),
        "rerun_tasks": sum(len(p) > 1 for p in procs.values()),
    }
