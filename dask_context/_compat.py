"""Every use of distributed's internals, in one place.

dask-context extends Dask through public hooks (plugins, scheduler handlers,
``Adaptive``). Routing also needs a few attributes that are not public API: the
restrictions on a ``TaskState``, the scheduler's transition engine, and on workers the
key of the running task. They are all here, and ``pyproject.toml`` pins distributed
to the range these were checked against (``TESTED``).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

import distributed
from packaging.version import Version

if TYPE_CHECKING:
    from distributed import Scheduler, Worker
    from distributed.scheduler import TaskState, WorkerState

logger = logging.getLogger(__name__)

TESTED = (Version("2026.7.0"), Version("2026.9.0"))

# Restricting a task to an address no worker has parks it in the scheduler's
# ``no-worker`` state (the empty set would mean "unrestricted"). Context tasks wait
# there until the scheduler plugin hands them to a worker.
PARKED = "dask-context://parked"


def check_version() -> None:
    """Warn when distributed is outside the range these internals were checked on."""
    version = Version(distributed.__version__)
    low, high = TESTED
    if not low <= version < high:
        logger.warning(
            "dask-context was tested with distributed >=%s,<%s; this is %s",
            low, high, version,
        )


def park(ts: TaskState) -> None:
    """Keep ``ts`` off every worker until :func:`send` places it."""
    ts.worker_restrictions = {PARKED}
    # strict: work stealing only moves a task between workers it is allowed on
    ts.loose_restrictions = False


def send(scheduler: Scheduler, placements: Iterable[tuple[TaskState, str]], stimulus_id: str) -> list[TaskState]:
    """Move parked (``no-worker``) tasks to the given workers.

    Returns the tasks that could not be placed (the worker stopped running
    meanwhile); they are still ``no-worker``.
    """
    moved = []
    for ts, address in placements:
        ts.worker_restrictions = {address}
        ts.loose_restrictions = False
        moved.append(ts)
    scheduler.transitions({ts.key: "processing" for ts in moved}, stimulus_id=stimulus_id)
    return [ts for ts in moved if ts.state == "no-worker"]


def running_workers(scheduler: Scheduler) -> list[WorkerState]:
    """Workers that accept tasks now (not paused, not closing)."""
    return list(scheduler.running)


def processing_count(ws: WorkerState) -> int:
    return len(ws.processing)


def results_nbytes(ws: WorkerState) -> int:
    return ws.nbytes


def compute_seconds(startstops: Any) -> float | None:
    """Compute time of a finished task from the ``startstops`` of its transition."""
    for ss in startstops or ():
        if ss.get("action") == "compute":
            return ss["stop"] - ss["start"]
    return None


def non_context_ready(scheduler: Scheduler, context_tasks: int) -> int:
    """Tasks ready or running that are not context tasks."""
    total = len(scheduler.queued) + len(scheduler.unrunnable)
    total += sum(len(ws.processing) for ws in scheduler.workers.values())
    return total - context_tasks


def current_key() -> Hashable | None:
    """Key of the task running in this worker thread, if any."""
    from distributed.worker import thread_state

    return getattr(thread_state, "key", None)


def running_keys(worker: Worker) -> set[Hashable]:
    """Keys of the tasks the worker is executing now."""
    state = worker.state
    return {ts.key for ts in (*state.executing, *state.long_running)}
