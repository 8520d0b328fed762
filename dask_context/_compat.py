"""Every use of distributed's and dask's internals, in one place.

dask-context extends Dask through public hooks (plugins, scheduler and worker
handlers, events, ``Adaptive``). Routing also needs a few attributes that are not
public API: the restrictions on a ``TaskState``, the scheduler's transition engine,
the spec of a task (to tell Dask's own plumbing from user code), and on workers the
running task's key and its annotations; and the standard library's fork-server
preloads (:mod:`dask_context.processes`). They are all here, and ``pyproject.toml``
pins dask and distributed to the range these were checked against (``TESTED``).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import sys
import time
from collections.abc import Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import dask.config
import distributed
from dask._task_spec import Alias, DataNode, GraphNode, Task
from packaging.version import Version

if TYPE_CHECKING:
    from distributed import Scheduler, Worker
    from distributed.scheduler import TaskState, WorkerState

logger = logging.getLogger(__name__)

TESTED = (Version("2025.12.0"), Version("2026.9.0"))


def require_supported(dask_version: str, distributed_version: str) -> None:
    """Refuse dask or distributed releases outside ``TESTED`` (what pyproject.toml states).

    Called when this module is imported: the internals used here change between
    releases, and a router that misreads them would misplace tasks, not fail.

    Raises
    ------
    ImportError
        Naming the supported range and what is installed.

    Examples
    --------
    >>> require_supported("2026.8.0", "2026.8.0")
    >>> require_supported("2025.11.0", "2025.11.0")
    Traceback (most recent call last):
    ...
    ImportError: dask-context supports dask and distributed >=2025.12.0,<2026.9.0; installed: dask 2025.11.0, distributed 2025.11.0. Install a supported release, e.g. pip install "distributed>=2025.12.0,<2026.9.0" (it pins the matching dask)
    """
    low, high = TESTED
    if not all(low <= Version(v) < high for v in (dask_version, distributed_version)):
        raise ImportError(
            f"dask-context supports dask and distributed >={low},<{high}; installed: "
            f"dask {dask_version}, distributed {distributed_version}. Install a supported "
            f'release, e.g. pip install "distributed>={low},<{high}" (it pins the matching dask)'
        )


require_supported(__import__("dask").__version__, distributed.__version__)

# Restricting a task to an address no worker has parks it in the scheduler's
# ``no-worker`` state (the empty set would mean "unrestricted"). Context tasks wait
# there until the scheduler plugin hands them to a worker.
PARKED = "dask-context://parked"

# Callables from these packages are Dask's own plumbing (or libraries no context
# loader lives in): a task made only of them never calls ``get_context``.
LIBRARY_PACKAGES = frozenset(
    {"dask", "distributed", "toolz", "tlz", "cytoolz", "operator", "builtins",
     "functools", "itertools", "numpy", "pandas", "pyarrow"}
)


def check_version() -> None:
    """Warn when distributed is outside the range these internals were checked on."""
    version = Version(distributed.__version__)
    low, high = TESTED
    if not low <= version < high:
        logger.warning(
            "dask-context was tested with distributed >=%s,<%s; this is %s",
            low, high, version,
        )


# ---------------------------------------------------------------- scheduler side
def park(ts: TaskState) -> None:
    """Keep ``ts`` off every worker until :func:`send` places it."""
    ts.worker_restrictions = {PARKED}
    # strict: work stealing only moves a task between workers it is allowed on
    ts.loose_restrictions = False


def is_running(scheduler: Scheduler, ws: WorkerState) -> bool:
    return ws in scheduler.running


def is_parked(ts: TaskState) -> bool:
    return bool(ts.worker_restrictions) and PARKED in ts.worker_restrictions


def unpark(ts: TaskState) -> None:
    """Give ``ts`` back to Dask's own scheduling (routed tasks had no restrictions)."""
    ts.worker_restrictions = None
    ts.loose_restrictions = False


def user_restricted(ts: TaskState) -> bool:
    """Whether the user pinned ``ts`` to workers or hosts (``workers=``)."""
    return bool(ts.worker_restrictions or ts.host_restrictions)


def has_resources(ws: WorkerState, request: Iterable[tuple[str, float]]) -> bool:
    """Whether ``ws`` has every resource of ``request`` (a :func:`resource_request`)."""
    return all(ws.resources.get(r, 0) >= q for r, q in request)


def resource_request(ts: TaskState) -> tuple[tuple[str, float], ...]:
    """What ``ts`` asks for with ``resources=``, as a hashable key (empty: nothing)."""
    return tuple(sorted((ts.resource_restrictions or {}).items()))


def workers_with(scheduler: Scheduler, request: Iterable[tuple[str, float]]) -> set[str]:
    """Workers that have every resource of a non-empty ``request`` in the quantity
    asked, from the scheduler's index of resources (as Dask's ``valid_workers``)."""
    fit: set[str] | None = None
    for resource, needed in request:
        have = {a for a, q in scheduler.resources.get(resource, {}).items() if q >= needed}
        fit = have if fit is None else fit & have
    return fit or set()


def send(scheduler: Scheduler, placements: Iterable[tuple[TaskState, str]], stimulus_id: str) -> None:
    """Move parked (``no-worker``) tasks to the given workers.

    A task that cannot go (the worker stopped running meanwhile) stays in
    ``no-worker``; the router's transition hook parks and queues it again.
    """
    recs = {}
    for ts, address in placements:
        ts.worker_restrictions = {address}
        ts.loose_restrictions = False
        recs[ts.key] = "processing"
    scheduler.transitions(recs, stimulus_id=stimulus_id)


def fail(scheduler: Scheduler, keys: Iterable[Hashable], error: dict[str, Any], stimulus_id: str) -> None:
    """Fail waiting (``no-worker``) tasks with ``error``, as if they had raised it.

    ``error`` holds the pickled ``exception`` and ``traceback`` and their texts
    (see :func:`dask_context.errors.error_payload`).
    """
    recs: dict = {}
    for key in keys:
        ts = scheduler.tasks.get(key)
        if ts is None or ts.state != "no-worker":
            continue
        recs.update(scheduler.transition(key, "erred", stimulus_id=stimulus_id, cause=key, **error))
    scheduler.transitions(recs, stimulus_id=stimulus_id)


def reschedule(scheduler: Scheduler, tasks: Iterable[TaskState], stimulus_id: str) -> None:
    """Let tasks whose restrictions changed be placed again.

    Tasks waiting in Dask's ``queued`` state ignore restrictions, so they are
    released first (they come back at once through ``waiting``); ``no-worker``
    tasks are simply tried again.
    """
    recs = {}
    for ts in tasks:
        if ts.state == "queued":
            recs[ts.key] = "released"
        elif ts.state == "no-worker":
            recs[ts.key] = "processing"
    if recs:
        scheduler.transitions(recs, stimulus_id=stimulus_id)


def tasks_of_group(scheduler: Scheduler, group: str) -> list[TaskState]:
    """Tasks of the task group named ``group``."""
    tg = scheduler.task_groups.get(group)
    if tg is None:
        return []
    return [ts for ts in scheduler.tasks.values() if ts.group is tg]


def clients_wanting(tasks: Iterable[TaskState], limit: int = 10_000) -> set[str]:
    """Clients that want ``tasks`` or a task that depends on them (at most ``limit``
    tasks are looked at: the tasks of one graph are submitted by one client)."""
    seen: set[TaskState] = set()
    stack = list(tasks)
    clients: set[str] = set()
    while stack and len(seen) < limit:
        ts = stack.pop()
        if ts in seen:
            continue
        seen.add(ts)
        clients.update(cs.client_key for cs in ts.who_wants or ())
        if not clients:
            stack.extend(ts.dependents)
    return clients


def warn_clients(scheduler: Scheduler, clients: Iterable[str], message: str) -> None:
    """Show ``message`` as a ``UserWarning`` on ``clients``, as a task's
    ``distributed.warn`` would (every client handles the ``"warn"`` topic)."""
    event = (time.time(), {"message": pickle.dumps(message), "category": pickle.dumps(UserWarning)})
    for client in clients:
        if client in scheduler.client_comms:
            scheduler.report({"op": "event", "topic": "warn", "event": event}, client=client)


def reinstall_plugin(scheduler: Scheduler, address: str, name: str) -> Any:
    """Send the worker plugin ``name`` the scheduler holds to the worker ``address`` again."""
    plugin = scheduler.worker_plugins.get(name)
    if plugin is None:
        return None
    return scheduler.broadcast(
        msg={"op": "plugin-add", "plugin": plugin, "name": name},
        workers=[address], on_error="return",
    )


def parked_unrunnable(scheduler: Scheduler) -> Iterator[TaskState]:
    """Tasks waiting in ``no-worker`` because the router parked them."""
    return (ts for ts in scheduler.unrunnable if is_parked(ts))


def running_workers(scheduler: Scheduler) -> list[WorkerState]:
    """Workers that accept tasks now (not paused, not closing)."""
    return list(scheduler.running)


def free_workers(scheduler: Scheduler) -> list[WorkerState]:
    """Running workers with a free thread.

    Read from the scheduler's indices kept by ``check_idle_saturated`` on every
    processing and status change, so that finding them does not scan every worker
    of a large cluster: ``idle``, and, for workers with seceded tasks,
    ``idle_task_count`` (workers below the worker-saturation slot count, which
    discounts seceded tasks as ``idle`` does not: a worker whose only task seceded
    has no occupancy left, so it is not idle).
    """
    idle = scheduler.idle
    seceded = [ws for ws in scheduler.idle_task_count if ws.long_running and ws.address not in idle]
    return [ws for ws in (*idle.values(), *seceded) if threads_in_use(ws) < ws.nthreads]


def threads_in_use(ws: WorkerState) -> int:
    """Tasks occupying a thread of the worker: those processing there, less those
    that seceded (``worker_client``, ``secede``), which left their thread to wait on
    tasks they submitted, as Dask's own slot count does; counting them would leave
    those tasks waiting on a thread that is free."""
    return len(ws.processing) - len(ws.long_running)


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


def may_call_user_code(spec: Any, depth: int = 0) -> bool:
    """Whether a task's spec calls anything beyond Dask's own plumbing.

    Aliases, literal data and tasks made only of dask, toolz, numpy or pandas
    callables (a bag's aggregate, the finalize step) never call ``get_context``;
    anything else (a user's function, in the task or fused into it) might. Unknown
    shapes count as user code.

    Examples
    --------
    >>> from dask._task_spec import Alias, DataNode, Task
    >>> def verify(claims): ...
    >>> may_call_user_code(Task("x", verify, [1, 2]))
    True
    >>> may_call_user_code(Task("y", sum, [1, 2])), may_call_user_code(Alias("z", "x"))
    (False, False)
    >>> may_call_user_code(Task.fuse(Task("a", len, "abc"), Task("b", verify, Alias("a")), key="b"))
    True
    """
    if depth > 8:
        return True
    if isinstance(spec, (Alias, DataNode)):
        return False
    if isinstance(spec, Task):
        if _user_callable(spec.func):
            return True
        return any(may_call_user_code(a, depth + 1) for a in (*spec.args, *spec.kwargs.values()))
    if isinstance(spec, GraphNode):
        return True
    if isinstance(spec, dict):
        return any(may_call_user_code(v, depth + 1) for v in spec.values())
    if isinstance(spec, (list, tuple, set, frozenset)):
        return len(spec) > 1000 or any(may_call_user_code(v, depth + 1) for v in spec)
    return callable(spec) and _user_callable(spec)


def fused_keys(task: Any) -> tuple[Hashable, ...]:
    """Keys of the tasks fused into ``task`` (``Task.fuse``), or ``()``."""
    has_subgraph = getattr(task, "has_subgraph", None)
    if callable(has_subgraph) and has_subgraph():
        inner = task.args[0]
        if isinstance(inner, dict):
            return tuple(inner)
    return ()


def _user_callable(func: Any) -> bool:
    for _ in range(4):  # functools.partial and the like wrap the function they call
        inner = getattr(func, "func", None)
        if inner is None or isinstance(func, type):
            break
        func = inner
    func = getattr(func, "__func__", func)  # bound methods
    module = getattr(func, "__module__", None) or type(func).__module__
    return (module or "").split(".")[0] not in LIBRARY_PACKAGES


# ---------------------------------------------------------------- worker side
def over_nanny_memory_limit(worker: Worker) -> bool:
    """Whether ``worker`` uses more memory than its nanny allows
    (``distributed.worker.memory.terminate`` of its memory limit, less a margin for
    what was freed since the nanny looked): the nanny is terminating it."""
    import psutil

    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
    fraction = dask.config.get("distributed.worker.memory.terminate")
    if not limit or fraction is False:
        return False
    return psutil.Process().memory_info().rss > (fraction - 0.05) * limit


def current_key() -> Hashable | None:
    """Key of the task running in this worker thread, if any."""
    from distributed.worker import thread_state

    return getattr(thread_state, "key", None)


@contextlib.contextmanager
def as_worker(worker: Worker) -> Iterator[None]:
    """Let ``get_worker()`` return ``worker`` in this thread (a load outside a task)."""
    from distributed.worker import _worker_cvar

    token = _worker_cvar.set(worker)
    try:
        yield
    finally:
        _worker_cvar.reset(token)


def running_keys(worker: Worker) -> set[Hashable]:
    """Keys of the tasks the worker is executing now."""
    state = worker.state
    return {ts.key for ts in (*state.executing, *state.long_running)}


def task_annotations(worker: Worker, key: Hashable) -> dict[str, Any]:
    ts = worker.state.tasks.get(key)
    return (ts.annotations or {}) if ts is not None else {}


def assigned_contexts(worker: Worker) -> set[str]:
    """Contexts that tasks assigned to this worker (running or about to) ask for."""
    out = set()
    for ts in list(worker.state.tasks.values()):
        if ts.state in ("memory", "released", "error", "forgotten", "cancelled"):
            continue
        name = (ts.annotations or {}).get("context")
        if isinstance(name, str):
            out.add(name)
    return out


#: worker task states of tasks the worker was sent and has not started
NOT_STARTED = frozenset({"waiting", "ready", "constrained"})


def stop_starting_tasks(worker: Worker) -> None:
    """Make ``worker`` start no more tasks, and tell the scheduler to send it none.

    ``closing_gracefully`` (the status ``Scheduler.retire_workers`` gives) pauses
    the worker's state machine: running tasks go on, ready ones wait. Unlike
    ``paused``, the memory monitor never resumes a worker from it.
    """
    from distributed.core import Status

    if worker.status in (Status.running, Status.paused):
        worker.status = Status.closing_gracefully


def not_started_keys(worker: Worker) -> list[Hashable]:
    """Keys of the tasks ``worker`` was sent and has not started."""
    return [ts.key for ts in list(worker.state.tasks.values()) if ts.state in NOT_STARTED]


def give_back(worker: Worker, keys: Iterable[Hashable], stimulus_id: str) -> None:
    """Hand tasks the worker has not started back to the scheduler.

    The scheduler's ``reschedule`` stream handler releases each one still
    processing on this worker (it then asks the worker to forget it) and places it
    again: a routed context task comes back to the router's queue. The worker must
    not start them meanwhile (:func:`stop_starting_tasks`).
    """
    for key in keys:
        worker.batched_send({"op": "reschedule", "key": key, "stimulus_id": stimulus_id})


def in_dask_worker_cli() -> bool:
    """Whether this process is a ``dask worker`` (the CLI), not a user's program.

    ``dask worker`` imports the CLI module; ``python -m distributed.cli.dask_worker``
    (how dask-jobqueue starts workers) runs it as ``__main__``.
    """
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "distributed.cli.dask_worker" in sys.modules or (
        main is not None and main.name == "distributed.cli.dask_worker"
    )


def batch_job() -> str | None:
    """The batch job this process runs in: its workers scale in together."""
    import os

    for var in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "FLUX_JOB_ID"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def nanny_mp_context() -> Any:
    """The multiprocessing context nannies start worker processes with.

    distributed sets its own fork-server preloads the first time it is asked for a
    ``forkserver`` context, and never again.
    """
    from distributed.utils import get_mp_context

    return get_mp_context()


def forkserver_preload() -> list[str]:
    """The modules multiprocessing's fork server imports when it starts (a copy).

    The standard library keeps them on its private fork-server singleton, with no
    getter; :mod:`dask_context.processes` extends the list distributed set.
    """
    from multiprocessing import forkserver

    return list(getattr(forkserver._forkserver, "_preload_modules", None) or [])


def forkserver_running() -> bool:
    """Whether this process started its fork server already (it keeps its preloads)."""
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None) is not None


def torch_if_imported() -> Any:
    """The torch module if something in this process imported it, else None.

    A torch that another thread is still importing is already in ``sys.modules``
    without its attributes (``torch.cuda``...); importing it here waits for that
    import to finish (the import system's lock per module) and returns it whole.
    """
    if "torch" not in sys.modules:
        return None
    import torch

    return torch


# ---------------------------------------------------------------- DataFrames
def callables_in(spec: Any, depth: int = 0) -> Iterator[Any]:
    """The callables in a task's spec: its function, those of the tasks fused into
    it, and those passed as arguments (how dask-expr hands a user's function to
    ``apply_and_enforce`` or ``methodcaller("apply")``).

    Examples
    --------
    >>> from dask._task_spec import Alias, Task
    >>> def f(x): ...
    >>> fused = Task.fuse(Task("a", len, "abc"), Task("b", map, f, Alias("a")), key="b")
    >>> [c.__name__ for c in callables_in(fused) if c is f]
    ['f']
    """
    if depth > 8:
        return
    if isinstance(spec, Task):
        yield spec.func
        for arg in (*spec.args, *spec.kwargs.values()):
            yield from callables_in(arg, depth + 1)
    elif isinstance(spec, DataNode):
        yield from callables_in(spec.value, depth + 1)
    elif isinstance(spec, dict):
        if len(spec) <= 1000:
            for value in spec.values():
                yield from callables_in(value, depth + 1)
    elif isinstance(spec, (list, tuple)):
        if len(spec) <= 1000:
            for value in spec:
                yield from callables_in(value, depth + 1)
    elif callable(spec) and not isinstance(spec, type):
        yield spec


def wrap_expr_functions(expr: Any, wrap: Any) -> Any:
    """``expr`` (a dask-expr expression) with ``wrap(f)`` for each user function
    among its own operands (``map_partitions``'s ``func``, ``apply``'s ``function``,
    ``map``'s ``arg``, ``groupby().apply``'s ``func``); the same ``expr`` when it has
    none. ``wrap`` returns its argument when it leaves it alone."""
    substitutions = {}
    # operands past _parameters are variadic (extra arguments): never the function
    for name, value in zip(getattr(expr, "_parameters", ()), getattr(expr, "operands", ()), strict=False):
        if callable(value) and not isinstance(value, type) and _user_callable(value):
            wrapped = wrap(value)
            if wrapped is not value:
                substitutions[name] = wrapped
    return expr.substitute_parameters(substitutions) if substitutions else expr


def hook_dataframes(on_new: Any) -> bool:
    """Pass the expression of every DataFrame or Series built from now on through
    ``on_new(expr, annotations)``, which returns the expression to use.

    dask.dataframe (query planning) ignores ``dask.annotate``: ``FrameBase.__init__``
    (every new collection goes through it) warns once per process that annotations
    "will be ignored". ``on_new`` carries what it handles into the expression
    itself; while a ``context`` annotation is the only one set, the warning would be
    wrong and is not given. Idempotent; False where dask.dataframe is unavailable.
    """
    try:
        from dask.dataframe.dask_expr import _collection
    except ImportError:  # no pandas
        return False
    base = _collection.FrameBase
    original = base.__init__
    if getattr(original, "_dask_context_hook", False):
        return True

    def __init__(self: Any, expr: Any) -> None:
        import dask

        annotations = dask.get_annotations()
        if not annotations:
            return original(self, expr)
        expr = on_new(expr, annotations)
        if set(annotations) - {"context"}:
            return original(self, expr)  # annotations it does not carry: Dask's warning holds
        warn = getattr(_collection, "_WARN_ANNOTATIONS", None)
        _collection._WARN_ANNOTATIONS = False
        try:
            original(self, expr)
        finally:
            if warn is not None:
                _collection._WARN_ANNOTATIONS = warn

    __init__._dask_context_hook = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    base.__init__ = __init__
    return True
