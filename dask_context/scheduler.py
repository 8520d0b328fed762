"""The SchedulerPlugin: keep context tasks on warm workers.

How a task that needs context ``"A"`` travels:

1. ``update_graph`` (before the scheduler places anything) parks it: a strict
   restriction to an address no worker has, so it waits in ``no-worker`` instead of
   going to whichever worker is free. Work stealing never moves it to a cold worker.
   Only tasks that may run user code are parked: Dask's own plumbing (aliases, a
   bag's aggregate, finalize steps) schedules as usual.
2. The ``transition`` hook sees it arrive in ``no-worker`` and queues it, by
   priority, in context A's queue.
3. ``_feed`` hands queued tasks to the workers A is *allowed* on (warm, warming, or
   chosen to warm), a few per worker at a time (threads + ``prefetch``; one while
   the worker is still loading A): only those are lost if the worker is preempted,
   and the rest stay free to go elsewhere.
4. ``_replan`` asks :func:`dask_context.policy.plan_routes` which workers each
   context may use: a cold worker is added only when the backlog per allowed worker
   is longer than a load. The evictions that implies are asked of the worker before
   it gets tasks of the new context, so that router and worker agree.

Workers report loads, evictions and failed loads with ``Worker.log_event`` (topic
``"dask-context"``), which reaches :meth:`ContextRouter.log_event`. A failed load
takes that worker out of the context's workers for a while and its task comes back
to the queue; the tasks fail with the loader's error only when the context fails
everywhere. When a worker leaves, the scheduler releases its tasks and they come
back to step 2; lost results are recomputed by Dask as usual.

Every hook is fail-safe: an error inside the router is logged and the tasks it
concerns are handed back to Dask's own scheduling, never left parked. The state
lives in :class:`dask_context.state.RouterState`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta
from distributed import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from dask_context import _compat, config, dashboard, graph
from dask_context.adaptive import Scaling
from dask_context.errors import UnknownContextError, error_payload
from dask_context.metrics import register_collector, unregister_collector
from dask_context.policy import (
    ContextView,
    Resident,
    WorkerView,
    load_failed_everywhere,
    plan_routes,
)
from dask_context.spec import ContextSpec, differences, from_config
from dask_context.state import ContextRecord, RoutedTask, RouterState, WorkerRecord, observe
from dask_context.worker import ROUTER_METADATA, TOPIC

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState, WorkerState

logger = logging.getLogger(__name__)

# topic of the warnings the router has for users; register() shows them on the client
WARNINGS = "dask-context-warnings"

# a re-plan runs at most every scheduler.interval, and no more often than every
# REPLAN_SHARE times its own duration (at most 5% of the scheduler's time); one asked
# for by a context no worker serves, every MIN_REPLAN_GAP s or URGENT_SHARE durations
REPLAN_SHARE = 20
MIN_REPLAN_GAP = 0.02
URGENT_SHARE = 5

# worker settings that are the cluster's policy (a worker added later takes them from
# the cluster's workers), as opposed to the worker's own hardware (device, node...)
CLUSTER_SETTINGS = frozenset(
    {"memory-budget", "memory-fraction", "host-memory-budget", "torch-threads", "failed-load-retry"}
)


def _ema(old: float | None, new: float, weight: float = 0.3) -> float:
    """Exponential moving average; the first sample stands alone.

    >>> _ema(None, 4.0), _ema(4.0, 2.0)
    (4.0, 3.4)
    """
    return new if old is None else (1 - weight) * old + weight * new


def _key(key: Any) -> Hashable:
    """Task keys arrive from workers as lists after msgpack; make them keys again."""
    return tuple(_key(k) for k in key) if isinstance(key, list) else key


def declared_specs() -> list[ContextSpec]:
    """The contexts declared in the ``dask-context.contexts`` setting.

    Raises
    ------
    SettingError
        If an entry is malformed or its loader cannot be imported (the message
        names the setting and the module).
    """
    return [
        from_config(entry, f"dask-context.contexts[{i}]")
        for i, entry in enumerate(config.get("contexts") or [])
    ]


class ContextRouter(SchedulerPlugin):
    """Route tasks that need a context to workers that hold it.

    Register it with :func:`dask_context.register` (which also registers the
    worker side), by hand with ``client.register_plugin(ContextRouter())``, or in
    the scheduler process with ``dask scheduler --preload dask_context``.
    Registering it again is a no-op (``idempotent``), so every client of a shared
    cluster may do it.

    Parameters
    ----------
    contexts
        Contexts known from the start, besides those of the ``dask-context.contexts``
        setting (which the router reads when it starts).
    """

    name = "dask-context"
    idempotent = True

    def __init__(self, contexts: Iterable[ContextSpec] = ()):
        self.initial = [spec.info() for spec in contexts]
        self.scheduler: Scheduler | None = None

    # ------------------------------------------------------------ lifecycle
    async def start(self, scheduler: Scheduler) -> None:
        if self.scheduler is scheduler:
            # ``dask scheduler --preload`` registers the plugin (which starts it) and
            # then starts every plugin of the scheduler: the second start is a no-op
            return
        _compat.check_version()
        self.scheduler = scheduler
        self.state = RouterState()
        self.durations: dict[str, float] = {}
        self.typical_duration: float | None = None
        # task group -> the context its tasks use (None: they use none, or several)
        self.learned: dict[str, str | None] = {}
        self._settings_by_nanny: dict[str, dict[str, Any]] = {}
        self._cluster_settings: dict[str, Any] = {}
        self._warned: set[str] = set()
        # contexts unregistered here: workers still tearing them down must not
        # bring them back by announcing what they hold
        self._unregistered: set[str] = set()
        # announcements of workers that have not registered yet (preloads)
        self._announced: dict[str, dict[str, Any]] = {}
        self._background: set[asyncio.Task] = set()
        self._wake_pending = False
        self._replan_wanted = True
        self._last_replan = -math.inf
        self._replan_seconds = 0.0
        # workers to feed (their slots opened), contexts with new tasks, and
        # workers known to have a free slot
        self._dirty_workers: set[str] = set()
        self._dirty_contexts: set[str] = set()
        self._free: set[str] = set()
        self._ticks = 0
        self._page = False
        self.prefetch = int(config.get("scheduler.prefetch"))
        self.interval = config.get_seconds("scheduler.interval")
        self.default_load_time = config.get_seconds("scheduler.default-load-time")
        self.failed_limit = int(config.get("scheduler.failed-load-workers"))
        self.retry = config.get_seconds("worker.failed-load-retry")
        self.stall_margin = config.get_seconds("scheduler.stall-margin")
        self.reconcile_interval = config.get_seconds("scheduler.reconcile-interval")
        self._last_survey = time.monotonic()
        self._surveying = False
        self.scaling = Scaling(self)
        self.unknown_duration = parse_timedelta(
            dask.config.get("distributed.scheduler.unknown-task-duration")
        )
        declared = [spec.info() for spec in declared_specs()]
        self.declared = {info["name"] for info in declared}
        for info in [*self.initial, *declared]:
            self.state.add_context(info)
        for address, ws in scheduler.workers.items():
            self.state.add_worker(address, ws.nthreads)

        if scheduler.no_workers_timeout:
            logger.warning(
                "distributed.scheduler.no-workers-timeout is set (%s s): context tasks "
                "queued longer than that will fail. Unset it to use dask-context.",
                scheduler.no_workers_timeout,
            )
        scheduler.set_metadata(ROUTER_METADATA, True)
        scheduler.handlers.update(
            {
                "dask_context_register": self.register,
                "dask_context_unregister": self.unregister,
                "dask_context_report": self.report,
                "dask_context_target": self.scaling.target,
                "dask_context_settings": self.worker_settings,
                "dask_context_worker": self.worker_joined,
                "dask_context_workers_to_close": self.scaling.workers_to_close,
                "dask_context_file_peers": self.file_peers,
                "dask_context_file_source": self.file_source,
                "dask_context_drain": self.scaling.drain,
                "dask_context_drained": self.scaling.drained,
            }
        )
        pc = PeriodicCallback(self._periodic, self.interval * 1000)
        scheduler.periodic_callbacks["dask-context"] = pc
        pc.start()
        self._collector = register_collector(self)
        if any(name.startswith("dask-context-") for name in scheduler.worker_plugins):
            # context plugins were set up before this router: ask what workers hold
            await self._survey()

    async def close(self) -> None:
        if self.scheduler is None:
            return
        self.scheduler.set_metadata(ROUTER_METADATA, False)
        pc = self.scheduler.periodic_callbacks.pop("dask-context", None)
        if pc is not None:
            pc.stop()
        for task in self._background:
            task.cancel()
        unregister_collector(self._collector)

    def restart(self, scheduler: Scheduler) -> None:
        # Scheduler.restart clears task metadata, where workers look for the router
        # before they announce their contexts
        scheduler.set_metadata(ROUTER_METADATA, True)

    async def _survey(self, repair: bool = False) -> None:
        """Make the router's records what the workers say they have.

        With ``repair``, a worker that has been running for a while without a
        context's worker plugin, or with an older spec of it, gets the plugin the
        scheduler holds again (its setup failed, or a message was lost).
        """
        if self._surveying:
            return
        self._surveying = True
        try:
            replies = await self.scheduler.broadcast(msg={"op": "dask_context_state"}, on_error="return")
            for address, reply in replies.items():
                w = self.state.workers.get(address)
                if isinstance(reply, dict) and w is not None:
                    # a repair takes the worker's word even over a record that claims
                    # to be newer: that claim may be what went wrong
                    self._apply(w, reply, force=repair)
            self.wake(replan=True)
            if repair:
                await self._reinstall()
        finally:
            self._surveying = False
            self._last_survey = time.monotonic()

    async def _reinstall(self) -> None:
        """Send context plugins again to running workers whose records lack them."""
        now = time.monotonic()
        for ws in _compat.running_workers(self.scheduler):
            w = self.state.workers.get(ws.address)
            if w is None or now - w.joined < self.stall_margin:
                continue  # its plugins may still be setting up
            for ctx in list(self.state.contexts.values()):
                if w.specs.get(ctx.name) == ctx.token:
                    continue
                sent = _compat.reinstall_plugin(self.scheduler, ws.address, f"dask-context-{ctx.name}")
                if sent is not None:
                    logger.error(
                        "Worker %s lacks the current spec of context %r: installing its "
                        "plugin again", ws.address, ctx.name,
                    )
                    await sent

    # ------------------------------------------------------------ handlers
    def register(self, specs: list[dict[str, Any]], replace: bool = False) -> dict[str, str]:
        """Scheduler handler: learn the contexts workers can load.

        Returns ``{"error": message}`` if a different spec is registered under a
        name and ``replace`` is false (the client raises ``DuplicateContextError``),
        else, per name, ``"added"``, ``"unchanged"`` (the identical spec is
        registered: nothing happens, warm copies stay), ``"declared"`` (the identical
        spec is declared in the cluster's ``dask-context.contexts`` setting, and its
        workers set it up themselves) or ``"replaced"``.
        """
        status = {}
        for info in specs:
            ctx = self.state.contexts.get(info["name"])
            if ctx is None:
                status[info["name"]] = "added"
            elif ctx.token == info["token"]:
                # declared in the cluster's configuration: workers set it up themselves
                status[info["name"]] = "declared" if ctx.name in self.declared else "unchanged"
            elif replace:
                status[info["name"]] = "replaced"
            else:
                differ = ", ".join(differences(ctx.fields, info["fields"]))
                # answered, not raised: a user's mistake is no error of the scheduler
                # (distributed logs a raising handler's traceback at ERROR)
                return {"error": (
                    f"context {info['name']!r} is already registered with a different "
                    f"{differ}; pass replace=True to replace it (its warm copies are "
                    "dropped and it loads again on first use)"
                )}
        self._show_page()
        for info in specs:
            self._unregistered.discard(info["name"])
            if status[info["name"]] in ("added", "replaced"):
                self._forget_learned(info["name"])
                self.state.add_context(info)
        self.wake(replan=True)
        return status

    def unregister(self, names: list[str]) -> list[str]:
        """Scheduler handler: forget contexts; their queued tasks fail.

        Raises
        ------
        UnknownContextError
            If a name is not registered.
        """
        for name in names:
            if name not in self.state.contexts:
                raise UnknownContextError(name, list(self.state.contexts))
        stimulus_id = f"dask-context-unregister-{time.time()}"
        for name in names:
            waiting = []
            for task in self.state.remove_context(name):
                ts = self.scheduler.tasks.get(task.key)
                if ts is None:
                    continue
                _compat.unpark(ts)
                if ts.state == "no-worker":
                    waiting.append(task.key)
            self._forget_learned(name)
            self._unregistered.add(name)
            error = UnknownContextError(name, list(self.state.contexts))
            _compat.fail(self.scheduler, waiting, error_payload(error), stimulus_id)
        self.wake(replan=True)
        return sorted(self.state.contexts)

    def worker_settings(self, worker: str, nanny: str | None, settings: dict[str, Any]) -> dict[str, Any]:
        """Scheduler handler: the settings a worker should use.

        ``dask.config.set`` around a cluster's creation does not reach workers that a
        nanny restarts or that the cluster adds later (the nanny copies Dask's
        settings shallowly). So a setting a worker leaves at its default takes the
        value its nanny's previous worker had, or, for the settings that are the
        cluster's policy rather than the worker's hardware (memory budget, failed-load
        retry...), the value the cluster's workers had. A worker's own explicit
        settings always win.
        """
        defaults = config.default("worker")
        own = {k: v for k, v in settings.items() if v != defaults.get(k)}
        if own:
            if nanny:
                self._settings_by_nanny[nanny] = own
            self._cluster_settings.update({k: v for k, v in own.items() if k in CLUSTER_SETTINGS})
        inherited = {**{k: v for k, v in self._cluster_settings.items() if k in CLUSTER_SETTINGS},
                     **self._settings_by_nanny.get(nanny or "", {})}
        effective = {**settings, **{k: v for k, v in inherited.items() if k not in own}}
        if effective != settings:
            logger.info("Worker %s takes the settings the cluster was given: %s", worker, inherited)
        return effective

    def worker_joined(self, worker: str, **snapshot: Any) -> None:
        """Scheduler handler: a worker's contexts (its plugins just set one up).

        A worker started with ``--preload dask_context`` announces its contexts
        before it registers with the scheduler: that announcement waits here until
        the worker joins.
        """
        if worker not in self.scheduler.workers:
            self._announced[worker] = snapshot
            return
        self._show_page()
        self._apply(self.state.add_worker(worker, self.scheduler.workers[worker].nthreads), snapshot)
        self.wake(replan=True, worker=worker)

    def _apply(self, w: WorkerRecord, snapshot: dict[str, Any], force: bool = False) -> bool:
        """Make the record of ``w`` what the worker says it has, unless a newer
        snapshot was applied already (see ``WorkerContexts.state``) and not ``force``.

        Returns whether it was applied.
        """
        seq = snapshot.get("seq")
        if seq is None or (seq <= w.seq and not force):
            return False
        w.seq = seq
        st = self.state
        w.budget, w.job = float(snapshot["budget"]), snapshot.get("job")
        for name, info in snapshot["specs"].items():
            # a context registered by hand (its worker plugin alone) becomes known here
            if name not in st.contexts and name not in self._unregistered:
                st.add_context(info)
        st.set_specs(w, {name: info["token"] for name, info in snapshot["specs"].items()})
        w.resident = {c: int(n) for c, n in snapshot["resident"].items() if c in st.contexts}
        w.host = {c: int(n) for c, n in snapshot["host"].items() if c in st.contexts}
        w.loading = {c for c in snapshot["loading"] if c in st.contexts}
        for c in (*w.resident, *w.loading):
            if w.specs.get(c) == st.contexts[c].token:
                st.contexts[c].allowed.add(w.address)
        for c in w.resident:
            w.unchoose(c)
        return True

    def _show_page(self) -> None:
        """Serve the dashboard's Contexts page once dask-context is in use here (a
        scheduler started before ``import dask_context`` lacks it)."""
        if not self._page:
            self._page = True
            try:
                dashboard.install(self.scheduler)
            except Exception:  # the page is a convenience: routing goes on without it
                logger.warning("Could not add the Contexts page to the dashboard", exc_info=True)

    def file_peers(self, name: str, token: str) -> list[dict[str, str]]:
        """Scheduler handler: workers with a node-local copy of a context's files.

        Returns ``[{"address": ..., "node": ...}]`` for running workers whose copy is
        of the spec with ``token``, warm ones first.
        """
        ctx = self.state.contexts.get(name)
        if ctx is None or ctx.token != token:
            return []
        running = {ws.address for ws in _compat.running_workers(self.scheduler)}
        peers = [a for a in ctx.staged if a in running]
        peers.sort(key=lambda a: name not in self.state.workers[a].resident)
        return [{"address": a, "node": ctx.staged[a]} for a in peers]

    def file_source(self, name: str, token: str, worker: str) -> bool:
        """Scheduler handler: may ``worker`` copy a context's files from ``files`` now?

        One running worker at a time does; the others wait for its copy and fetch it
        from that worker instead of splitting the shared filesystem's bandwidth. The
        turn ends when that worker reports "staged" or "unstaged", or leaves.
        """
        ctx = self.state.contexts.get(name)
        if ctx is None or ctx.token != token:
            return True
        running = {ws.address for ws in _compat.running_workers(self.scheduler)}
        if ctx.reader not in running or ctx.reader == worker:
            ctx.reader = worker
            return True
        return False

    def report(self) -> dict[str, Any]:
        """Scheduler handler: plain-data summary of every context and worker."""
        st = self.state
        contexts = {}
        for name in sorted(st.contexts):
            c = st.contexts[name]
            contexts[name] = {
                "loads": c.loads,
                "rewarms": c.rewarms,
                "load_seconds": c.load_seconds,
                "load_time": c.load_time,
                "nbytes": c.nbytes,
                "memory": c.memory,
                "evictions": c.evictions,
                "failures": c.failures,
                "tasks": c.tasks,
                "hits": c.hits,
                "warmups": c.warmups,
                "requeued": c.requeued,
                "queued": c.waiting,
                "running": sum(w.inflight(name) for w in st.workers.values()),
                "warm": sorted(a for a, w in st.workers.items() if name in w.resident),
                "loading": sorted(a for a, w in st.workers.items() if name in w.loading),
                "allowed": sorted(c.allowed),
                "failed_on": sorted(c.failed_on),
                "error": c.error["exception_text"] if c.error else None,
            }
        workers = {
            a: {
                "budget": w.budget,
                "resident": dict(w.resident),
                "host": dict(w.host),
                "loading": sorted(w.loading),
                "inflight": w.inflight(),
                "job": w.job,
                "draining": w.draining,
            }
            for a, w in sorted(st.workers.items())
        }
        return {"contexts": contexts, "workers": workers}

    # ------------------------------------------------------------ graph intake
    def update_graph(
        self, scheduler: Scheduler, *, tasks: list[Hashable] = (),
        annotations: dict[str, dict] | None = None, **kwargs: Any,
    ) -> None:
        """Park every new task that needs a context, before the scheduler places it."""
        routed: list[Hashable] = []
        client = kwargs.get("client")
        try:
            for key, name in (annotations or {}).get("context", {}).items():
                ts = scheduler.tasks.get(key)
                if ts is not None and self._known(name, client) and self._routable(ts, client):
                    self._route(ts, name)
                    routed.append(key)
            if self.state.contexts:
                # DataFrames keep no annotations: the mark is on the user's function
                # in the task's spec (graph.Routed), however dask-expr fused it
                for key in tasks:
                    ts = scheduler.tasks.get(key)
                    if ts is None or ts.key in self.state.tasks:
                        continue
                    name = graph.marked_context(ts.run_spec)
                    if name is not None and self._known(name, client) and self._routable(ts, client):
                        self._route(ts, name, annotate=True)
                        routed.append(key)
            if self.learned:
                for key in tasks:
                    ts = scheduler.tasks.get(key)
                    name = self.learned.get(ts.group.name) if ts is not None else None
                    if name is not None and self._routable(ts, client):
                        self._route(ts, name, annotate=True)
                        routed.append(key)
        except Exception:
            self._fail_safe("update_graph", routed)

    def _routable(self, ts: TaskState, client: str | None) -> bool:
        if ts.state != "released" or ts.run_spec is None or ts.key in self.state.tasks:
            return False
        if self.learned.get(ts.group.name, "") is None:
            return False  # its group is known not to use the context
        if _compat.user_restricted(ts):
            self._warn_once(
                f"restricted:{ts.group.name}", [client],
                "Tasks of %s are pinned to workers (workers=...): they are not routed",
                ts.group.name,
            )
            return False
        return _compat.may_call_user_code(ts.run_spec)

    def _route(self, ts: TaskState, name: str, annotate: bool = False) -> RoutedTask:
        if annotate:
            # the worker reads the annotation: a failed load sends the task back here
            ts.annotations = {**(ts.annotations or {}), "context": name}
        task = self.state.route(ts.key, name, ts.group.name, ts.prefix.name, ts.priority or ())
        _compat.park(ts)
        return task

    def _known(self, name: Any, client: str | None) -> bool:
        if isinstance(name, str) and name in self.state.contexts:
            return True
        self._warn_once(
            f"unknown:{name!r}", [client],
            "Tasks ask for context %r, which is not registered (known: %s); they run "
            "unrouted and get_context() will raise UnknownContextError",
            name, sorted(self.state.contexts),
        )
        return False

    def _warn_once(self, tag: str, clients: Iterable[str | None], message: str, *args: Any) -> None:
        """Log advice for users once, and show it on the clients whose tasks it concerns."""
        if tag not in self._warned:
            self._warned.add(tag)
            logger.warning(message, *args)
            self.scheduler.log_event(WARNINGS, {"message": message % args})
            _compat.warn_clients(self.scheduler, {c for c in clients if c}, message % args)

    # ------------------------------------------------------------ transitions
    def transition(self, key: Hashable, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        task = self.state.tasks.get(key)
        if task is None:
            return
        try:
            self._transition(task, start, finish, kwargs)
        except Exception:
            self._fail_safe("transition", [key])

    def _transition(self, task: RoutedTask, start: str, finish: str, kwargs: dict[str, Any]) -> None:
        st = self.state
        if start == "processing":
            w = st.left_worker(task)
            if finish == "memory":
                self._finished(task, w, kwargs.get("startstops"))
            if w is not None:
                self.wake(worker=w.address)
        elif start == "no-worker":
            st.dequeue(task)
        if finish == "no-worker":
            ts = self.scheduler.tasks[task.key]
            _compat.park(ts)  # a placement that did not happen leaves {address}
            st.enqueue(task)
            # a context nobody serves yet needs a plan now, not at the next tick
            self.wake(replan=not st.contexts[task.context].allowed, context=task.context)
        elif finish == "processing":
            ws = self.scheduler.tasks[task.key].processing_on
            if ws is not None:
                st.sent(task, ws.address)
        elif finish == "released":
            # lost with its worker, sent back after a failed load, or cancelled:
            # if it runs again, it comes back through the queue
            _compat.park(self.scheduler.tasks[task.key])
        elif finish == "forgotten":
            st.forget(task.key)

    def _finished(self, task: RoutedTask, w: WorkerRecord | None, startstops: Any) -> None:
        ctx = self.state.contexts[task.context]
        ctx.tasks += 1
        if task.load_seconds is None:
            ctx.hits += 1
        if w is not None:
            w.last_used[task.context] = time.monotonic()
        seconds = _compat.compute_seconds(startstops)
        if seconds is not None:
            # the task that loaded the context ran longer by the load time: take it out
            seconds = max(0.0, seconds - (task.load_seconds or 0.0))
            self.durations[task.prefix] = _ema(self.durations.get(task.prefix), seconds)
            self.typical_duration = _ema(self.typical_duration, seconds, weight=0.05)
        task.load_seconds = None

    # ------------------------------------------------------------ worker events
    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or not isinstance(msg, dict):
            return
        try:
            self._event(msg)
        except Exception:
            self._fail_safe("log_event", self._all_waiting())

    def _event(self, msg: dict[str, Any]) -> None:
        st = self.state
        w = st.workers.get(msg.get("worker"))
        if w is None:
            return
        if "seq" in msg:
            self._apply(w, msg)
        action, name = msg.get("action"), msg.get("context")
        if action == "uses":
            self._learn(msg["group"], name)
        elif action == "unused":
            self._unlearn(msg["group"], name)
        ctx = st.contexts.get(name)
        if ctx is None:
            self.wake(replan=True)
            return
        if action == "loaded":
            if msg.get("from") == "host":
                # a copy back from host memory says nothing of a load from storage
                ctx.rewarms += 1
            else:
                ctx.loads += 1
                ctx.load_seconds += msg["seconds"]
                observe(ctx.load_buckets, msg["seconds"])
                ctx.load_time = _ema(ctx.load_time, msg["seconds"])
            ctx.nbytes = int(msg["nbytes"])
            task = st.tasks.get(_key(msg.get("key")))
            if task is not None:
                task.load_seconds = msg["seconds"]
        elif action == "evicted":
            w.unchoose(name)
            ctx.allowed.discard(w.address)
            ctx.evictions += 1
            ctx.unload_seconds += msg.get("seconds", 0.0)
            observe(ctx.unload_buckets, msg.get("seconds", 0.0))
        elif action == "staged":
            if msg.get("token") == ctx.token:
                ctx.staged[w.address] = msg["node"]
            if ctx.reader == w.address:
                ctx.reader = None
        elif action == "unstaged":
            ctx.staged.pop(w.address, None)
            if ctx.reader == w.address:
                ctx.reader = None
        elif action == "failed":
            ctx.failures += 1
            ctx.error = msg.get("payload") or error_payload(RuntimeError(msg.get("error")))
            st.exclude(ctx, w.address, time.monotonic())
            logger.warning(
                "Loading context %r failed on %s (%s); its tasks go to other workers",
                name, w.address, msg.get("error"),
            )
        self.wake(replan=True, worker=w.address)

    # ------------------------------------------------------------ learning
    def _learn(self, group: str, name: str) -> None:
        """Tasks of ``group`` call ``get_context(name)`` without being marked: route them."""
        if name not in self.state.contexts or group in self.learned:
            if self.learned.get(group, name) != name:
                self.learned[group] = None  # several contexts: leave the group alone
            return
        self.learned[group] = name
        tasks = _compat.tasks_of_group(self.scheduler, group)
        self._warn_once(
            f"learned:{group}", _compat.clients_wanting(tasks),
            "Tasks of %s call get_context(%r) but were not marked as needing it; the "
            "rest of them are routed now. Build or compute them inside "
            "dask_context.use(%r) (or use @dask_context.delayed) so that all are.",
            group, name, name,
        )
        pending = []
        for ts in tasks:
            if ts.state in ("released", "waiting", "queued", "no-worker") and self._routable_later(ts):
                self._route(ts, name, annotate=True)
                pending.append(ts)
        self._later(_compat.reschedule, pending)

    def _routable_later(self, ts: TaskState) -> bool:
        return ts.key not in self.state.tasks and ts.run_spec is not None and not _compat.user_restricted(ts)

    def _unlearn(self, group: str, name: str) -> None:
        """Tasks of ``group`` were marked as needing ``name`` but never asked for it."""
        self.learned[group] = None
        tasks = [t for t in self.state.tasks.values() if t.group == group and t.worker is None]
        self._release([t.key for t in tasks])

    def _forget_learned(self, name: str) -> None:
        for group in [g for g, c in self.learned.items() if c == name]:
            del self.learned[group]

    # ------------------------------------------------------------ membership
    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.state.add_worker(worker, scheduler.workers[worker].nthreads)
        announced = self._announced.pop(worker, None)
        if announced is not None:
            self.worker_joined(worker, **announced)
        self.wake(replan=True)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        self._announced.pop(worker, None)
        self.scaling.worker_left(worker)
        try:
            self.state.remove_worker(worker)
        except Exception:
            self._fail_safe("remove_worker", self._all_waiting())
        self.wake(replan=True)

    # ------------------------------------------------------------ routing
    def wake(self, replan: bool = False, worker: str | None = None, context: str | None = None) -> None:
        """Route once the current handler ends: feed ``worker`` (its slots opened),
        the workers that may serve ``context`` (it has new tasks), and re-plan first
        if asked (at most once per ``scheduler.interval`` unless a context with
        queued tasks has no worker at all).
        """
        self._replan_wanted |= replan
        if worker is not None:
            self._dirty_workers.add(worker)
        if context is not None:
            self._dirty_contexts.add(context)
        if not self._wake_pending:
            self._wake_pending = True
            self.scheduler.loop.add_callback(self._run)

    def _periodic(self) -> None:
        self._ticks += 1
        now = time.monotonic()
        self.state.expire_failures(now, self.retry)
        # queued work may be worth spreading as its backlog grows; with none, only
        # stale choices and over-full workers are left to tidy, now and then
        self._replan_wanted |= bool(self.state.queued) or self._ticks % 5 == 0
        # workers whose slots opened without a routed task leaving them (plain tasks
        # finished there) are fed here: a scan of the workers, a few times a second
        self._dirty_workers.update(
            ws.address for ws in _compat.running_workers(self.scheduler)
            if _compat.processing_count(ws) < ws.nthreads
        )
        if self._ticks % 5 == 0:
            self._reconcile(full=self._ticks % 25 == 0)
        if self.state.contexts and now - self._last_survey > self.reconcile_interval and any(
            c.waiting for c in self.state.contexts.values()
        ):
            self._spawn(self._survey())
        try:
            self._guard(now)
        except Exception:
            self._fail_safe("guard", self._all_waiting())
        if self._ticks % 50 == 0:
            self.learned = {g: c for g, c in self.learned.items() if g in self.scheduler.task_groups}
        self._run()

    def _run(self) -> None:
        self._wake_pending = False
        try:
            if self.state.failing:
                self._fail_hopeless()
            now = time.monotonic()
            since = now - self._last_replan
            # a plan looks at every worker: on a large cluster it runs less often, so
            # that planning never takes more than a small share of the scheduler
            if self._replan_wanted and (
                since >= max(self.interval, REPLAN_SHARE * self._replan_seconds)
                or (since >= max(MIN_REPLAN_GAP, URGENT_SHARE * self._replan_seconds)
                    and self._unserved())
            ):
                self._replan_wanted = False
                self._last_replan = now
                self._replan()
                self._warm_up()
                self._replan_seconds = time.monotonic() - now
            self._feed()
        except Exception:
            self._fail_safe("routing", self._all_waiting())

    def _unserved(self) -> bool:
        """Whether a context with queued tasks has no worker to go to."""
        return any(not self.state.contexts[c].allowed for c in self.state.queued)

    def views(self, routing: bool = True) -> tuple[dict[str, ContextView], dict[str, WorkerView]]:
        """Plain-data views for the policies.

        ``routing`` discounts unmeasured task durations while a measurement is due
        (see :meth:`_duration`); scaling must not, or adapt would cancel the jobs it
        has just asked for whenever a first load outlasts its ``wait_count``.
        """
        st = self.state
        running = {ws.address: ws for ws in _compat.running_workers(self.scheduler)}
        records = {a: st.workers[a] for a in running if a in st.workers}
        contexts = {}
        now = time.monotonic()
        draining = {a for a, w in records.items() if w.draining}
        for c, ctx in st.contexts.items():
            head = st.head(ctx)
            # a measured load against a guessed duration would warm workers on no
            # evidence (a warm worker is measuring its tasks' duration now); guesses
            # on both sides (before the first load) are comparable
            measuring = routing and ctx.load_time is not None
            contexts[c] = ContextView(
                queued=ctx.waiting,
                backlog=sum(n * self._duration(p, measuring) for p, n in ctx.by_prefix.items()),
                load_time=self._load_time(ctx),
                nbytes=ctx.size(),
                allowed=frozenset(ctx.allowed),
                first=head.priority if head is not None else (),
                # the workers _can_load refuses, from indexes kept as they change
                excluded=frozenset(ctx.lacking.union(ctx.failed_on, draining)),
                waited=now - ctx.since if ctx.since is not None else 0.0,
                failing=bool(ctx.failed_on) and not any(
                    c in st.workers[a].resident for a in ctx.allowed if a in st.workers
                ),
            )
        workers = {}
        for a, w in records.items():
            held = {c: Resident(n, w.last_used.get(c, 0.0)) for c, n in w.resident.items()}
            unmeasured = set()
            for c in (*w.loading, *w.chosen):
                size = st.contexts[c].size() if c in st.contexts else None
                if size is None:
                    unmeasured.add(c)
                held.setdefault(c, Resident(size or 0, math.inf))
            workers[a] = WorkerView(
                budget=math.inf if w.budget is None else w.budget,
                resident=held,
                inflight=_compat.processing_count(running[a]),
                busy=frozenset(w.tasks),
                unmeasured=frozenset(unmeasured),
            )
        return contexts, workers

    def _can_load(self, w: WorkerRecord, ctx: ContextRecord) -> bool:
        """The worker has this spec set up, has not failed to load it, is not leaving."""
        return w.specs.get(ctx.name) == ctx.token and ctx.name not in w.failed and not w.draining

    def _duration(self, prefix: str, measuring: bool) -> float:
        """Estimated seconds of a task of ``prefix``.

        An unknown duration counts as the average of the context tasks measured so
        far (distributed's ``unknown-task-duration`` before any), except
        (``measuring``) when the context's load time is already measured: a warm
        worker runs its tasks, and their duration is due soon.
        """
        known = self.durations.get(prefix)
        if known is not None:
            return known
        if measuring:
            return 0.0
        # tasks of a new prefix are guessed to take as long as the context tasks
        # seen so far, before any: distributed's unknown-task-duration
        return self.typical_duration if self.typical_duration is not None else self.unknown_duration

    def _load_time(self, ctx: ContextRecord) -> float:
        if ctx.load_time is not None:
            return ctx.load_time
        return self.default_load_time if ctx.load_time_hint is None else ctx.load_time_hint

    def _replan(self) -> None:
        st = self.state
        self._drop_stale_choices()
        contexts, workers = self.views()
        plan = plan_routes(contexts, workers, settle=self.interval)
        now = time.monotonic()
        for name, added in plan.add.items():
            ctx = st.contexts[name]
            for address in added:
                w = st.workers[address]
                if not w.holds(name) and name not in w.chosen:
                    w.chosen[name] = now
                    ctx.warmups += 1
                logger.debug("Context %r may now run on %s", name, address)
            ctx.allowed |= added
            self._dirty_workers |= added
        for address, victims in plan.evict.items():
            w = st.workers[address]
            for name in victims:
                st.contexts[name].allowed.discard(address)
                w.unchoose(name)
            held = [v for v in victims if v in w.resident or v in w.loading]
            if held:
                w.evicting.update(held)
                self._spawn(self._evict(address, held))

    def _drop_stale_choices(self) -> None:
        """Forget warm-up choices that no longer have work, and allowed workers that
        neither hold a context nor were chosen for it."""
        st = self.state
        for ctx in st.contexts.values():
            for address in list(ctx.allowed):
                w = st.workers.get(address)
                if w is None or not self._can_load(w, ctx):
                    ctx.allowed.discard(address)
                    if w is not None:
                        w.unchoose(ctx.name)
                elif ctx.name in w.chosen and not ctx.waiting and not w.inflight(ctx.name):
                    if not w.holds(ctx.name):
                        ctx.allowed.discard(address)
                    w.unchoose(ctx.name)
                elif not (w.holds(ctx.name) or ctx.name in w.chosen or w.inflight(ctx.name)):
                    ctx.allowed.discard(address)

    def _warm_up(self) -> None:
        """Ask the workers chosen to warm a context to load it (once their room is made)."""
        for address, w in self.state.workers.items():
            if w.evicting:
                continue
            for name in w.chosen:
                if name not in w.asked and not w.holds(name):
                    w.asked.add(name)
                    self._spawn(self._ask_to_load(address, name))

    async def _ask_to_load(self, address: str, name: str) -> None:
        try:
            await self.scheduler.rpc(address).dask_context_warm(name=name)
        except Exception as exc:  # the worker left; remove_worker cleans up
            logger.info("Could not ask %s to load %r: %r", address, name, exc)

    async def _evict(self, address: str, names: list[str]) -> None:
        """Ask a worker to evict ``names`` before it warms up what replaces them."""
        try:
            evicted = await self.scheduler.rpc(address).dask_context_evict(names=names)
        except Exception as exc:  # the worker left; remove_worker cleans up
            logger.info("Could not ask %s to evict %s: %r", address, names, exc)
            evicted = []
        w = self.state.workers.get(address)
        if w is not None:
            w.evicting.difference_update(names)
            if set(names) - set(evicted):
                # a task there still needs it: the warm-up that needed the room waits
                for name in [c for c in w.chosen if not w.holds(c)]:
                    w.unchoose(name)
                    self.state.contexts[name].allowed.discard(address)
        self.wake(replan=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _feed(self) -> None:
        """Hand queued context tasks to the workers whose slots opened and to free
        workers of the contexts that got new tasks.

        Only those are looked at: the work per event does not grow with the
        workers or the contexts of the cluster.
        """
        st = self.state
        candidates, self._dirty_workers = self._dirty_workers, set()
        contexts, self._dirty_contexts = self._dirty_contexts, set()
        for name in contexts:
            ctx = st.contexts.get(name)
            if ctx is None or not ctx.waiting:
                continue
            free = self._free
            small, large = (ctx.allowed, free) if len(ctx.allowed) < len(free) else (free, ctx.allowed)
            candidates.update(a for a in small if a in large)
        placements: list[tuple[TaskState, str]] = []
        for address in candidates:
            ws = self.scheduler.workers.get(address)
            w = st.workers.get(address)
            if ws is None or w is None or w.draining or not _compat.is_running(self.scheduler, ws):
                self._free.discard(address)
                continue
            # only warm contexts: a worker loads a context before it gets any of its
            # tasks, so that a worker lost (or preempted) during a load takes no task
            # with it and no thread waits for a load
            usable = [
                ctx for c in w.resident
                if (ctx := st.contexts.get(c)) is not None and ctx.waiting
                and address in ctx.allowed and self._can_load(w, ctx)
            ]
            # prefetch only while there is work for every worker serving these
            # contexts: at the tail, a prefetched task would wait behind a running
            # one while another warm worker idles
            extra = self.prefetch if any(c.waiting > len(c.allowed) for c in usable) else 0
            free = ws.nthreads + extra - _compat.processing_count(ws)
            while free > 0 and usable:
                heads = [(t.priority, t.seq, c) for c in usable if (t := st.head(c)) is not None]
                if not heads:
                    break
                _, _, c = min(heads)
                task = st.pop_head(c)
                ts = self.scheduler.tasks[task.key]
                if not _compat.fits_resources(ts, ws):
                    st.enqueue(task)
                    usable.remove(c)
                    continue
                placements.append((ts, address))
                free -= 1
            if free > 0:
                self._free.add(address)
            else:
                self._free.discard(address)
        if placements:
            _compat.send(self.scheduler, placements, f"dask-context-feed-{time.time()}")

    def _fail_hopeless(self) -> None:
        """Fail the queued tasks of contexts whose load failed everywhere it was tried."""
        st = self.state
        running = {ws.address for ws in _compat.running_workers(self.scheduler)}
        for name in list(st.failing):
            ctx = st.contexts[name]
            if not ctx.waiting or ctx.error is None:
                continue
            serving = any(w.holds(ctx.name) for w in st.workers.values())
            if load_failed_everywhere(ctx.failed_on.keys(), running, serving, self.failed_limit):
                keys = [t.key for t in st.waiting_tasks(ctx)]
                logger.error(
                    "Context %r failed to load on %d worker(s) (%s): failing %d queued task(s)",
                    ctx.name, len(ctx.failed_on), ctx.error["exception_text"], len(keys),
                )
                _compat.fail(self.scheduler, keys, ctx.error, f"dask-context-failed-{time.time()}")

    def _guard(self, now: float) -> None:
        """Act on a context whose queued tasks wait while a worker could serve them.

        A context stalls when none of its tasks was sent to a worker for longer than
        a load plus ``scheduler.stall-margin`` while a running worker that may load
        it sits idle. The first time, the router's records of the workers are read
        again from the workers, missing plugins are installed again and routing is
        re-planned; if it stalls again, its queued tasks go back to Dask's own
        scheduling (they load the context where they land). Both are logged at
        ERROR: a stall is a bug of the router, never a state to wait in.
        """
        for ctx in self.state.contexts.values():
            if not ctx.waiting:
                ctx.stalls = 0
                continue
            waited = now - max(ctx.since or now, ctx.progress)
            if waited < self._load_time(ctx) + self.stall_margin or not self._idle_servers(ctx):
                continue
            ctx.progress = now
            if ctx.stalls == 0:
                ctx.stalls = 1
                logger.error(
                    "Context %r: %d task(s) waited %.1f s while workers could serve them; "
                    "reading the workers' contexts again and re-planning",
                    ctx.name, ctx.waiting, waited,
                )
                self._spawn(self._survey(repair=True))
                self.wake(replan=True)
            else:
                ctx.stalls = 0
                keys = [t.key for t in self.state.waiting_tasks(ctx)]
                logger.error(
                    "Context %r: %d task(s) still wait after a re-plan; handing them back "
                    "to Dask's own scheduling", ctx.name, len(keys),
                )
                self._release(keys)

    def _idle_servers(self, ctx: ContextRecord) -> list[str]:
        """Running workers with a free thread that may load ``ctx``."""
        return [
            ws.address for ws in _compat.running_workers(self.scheduler)
            if _compat.processing_count(ws) < ws.nthreads
            and (w := self.state.workers.get(ws.address)) is not None
            and not w.draining and ctx.name not in w.failed
        ]

    # ------------------------------------------------------------ fail-safe
    def _all_waiting(self) -> list[Hashable]:
        return [t.key for t in self.state.tasks.values() if t.seq is not None]

    def _fail_safe(self, where: str, keys: list[Hashable]) -> None:
        """An error inside the router: hand the tasks concerned back to Dask."""
        logger.error(
            "dask-context router failed in %s; %d task(s) go back to Dask's own scheduling",
            where, len(keys), exc_info=True,
        )
        try:
            self._release(keys)
        except Exception:
            logger.critical("dask-context could not hand tasks back to Dask", exc_info=True)

    def _release(self, keys: list[Hashable]) -> None:
        """Stop routing ``keys``: their tasks schedule as plain Dask tasks from now on."""
        pending = []
        for key in keys:
            self.state.forget(key)
            ts = self.scheduler.tasks.get(key)
            if ts is not None and _compat.is_parked(ts):
                _compat.unpark(ts)
                pending.append(ts)
        self._later(_compat.reschedule, pending)

    def _later(self, fn: Any, tasks: list[TaskState]) -> None:
        """Run ``fn(scheduler, tasks, stimulus_id)`` after the current transitions."""
        if tasks:
            self.scheduler.loop.add_callback(
                fn, self.scheduler, tasks, f"dask-context-{fn.__name__}-{time.time()}"
            )

    def _reconcile(self, full: bool) -> None:
        """Guarantee that no parked task is stranded: each is queued, or given back."""
        waiting = sum(c.waiting for c in self.state.contexts.values())
        if not full and len(self.scheduler.unrunnable) == waiting:
            return
        stranded = []
        for ts in list(_compat.parked_unrunnable(self.scheduler)):
            task = self.state.tasks.get(ts.key)
            if task is None or task.context not in self.state.contexts:
                stranded.append(ts.key)
            elif task.seq is None:
                logger.warning("dask-context re-queues %r, which was parked but not queued", ts.key)
                self.state.enqueue(task)
        if stranded:
            logger.error("dask-context found %d parked task(s) it does not route; giving them back", len(stranded))
            self._release(stranded)

    # ------------------------------------------------------------ adaptive
    def valid_workers_downscaling(self, scheduler: Scheduler, workers: list[WorkerState]) -> list[WorkerState]:
        """Keep warm workers worth keeping out of scale-in (see :class:`~dask_context.adaptive.Scaling`)."""
        return self.scaling.valid_workers_downscaling(workers)
