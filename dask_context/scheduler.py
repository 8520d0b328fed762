"""The SchedulerPlugin: keep context tasks on warm workers.

How a task annotated with ``context="A"`` travels:

1. ``update_graph`` (before the scheduler places anything) parks it: a strict
   restriction to an address no worker has, so it waits in ``no-worker`` instead of
   going to whichever worker is free. Work stealing never moves it to a cold worker.
2. The ``transition`` hook sees it arrive in ``no-worker`` and queues it, by
   priority, in context A's queue.
3. ``_feed`` hands queued tasks to the workers A is *allowed* on (warm, warming, or
   chosen to warm), a few per worker at a time (threads + ``prefetch``): only those
   are lost if the worker is preempted, and the rest stay free to go elsewhere.
4. ``_replan`` asks :func:`dask_context.policy.plan_routes` which workers each
   context may use: a cold worker is added only when the backlog per allowed worker
   is longer than a load.

Workers report loads and evictions with ``Worker.log_event`` (topic
``"dask-context"``), which reaches :meth:`ContextRouter.log_event`. When a worker
leaves, the scheduler releases its tasks and they come back to step 2; lost results
are recomputed by Dask as usual.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta
from distributed import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from dask_context import _compat, config
from dask_context.errors import DuplicateContextError
from dask_context.metrics import register_collector, unregister_collector
from dask_context.policy import (
    ContextView,
    Resident,
    RetireView,
    WorkerView,
    plan_routes,
    retire_order,
    workers_wanted,
)
from dask_context.worker import ROUTER_METADATA, TOPIC

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import TaskState, WorkerState

logger = logging.getLogger(__name__)



def _ema(old: float | None, new: float, weight: float = 0.3) -> float:
    """Exponential moving average; the first sample stands alone.

    >>> _ema(None, 4.0), _ema(4.0, 2.0)
    (4.0, 3.4)
    """
    return new if old is None else (1 - weight) * old + weight * new


def _key(key: Any) -> Hashable:
    """Task keys arrive from workers as lists after msgpack; make them keys again."""
    return tuple(_key(k) for k in key) if isinstance(key, list) else key


class ContextStats:
    """Counters per context, for reports and Prometheus."""

    def __init__(self) -> None:
        self.loads: Counter[str] = Counter()
        self.load_seconds: Counter[str] = Counter()
        self.evictions: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.tasks: Counter[str] = Counter()
        self.warmups: Counter[str] = Counter()
        self.requeued: Counter[str] = Counter()


class ContextRouter(SchedulerPlugin):
    """Route tasks that need a context to workers that hold it.

    Register it with :func:`dask_context.register` (which also registers the
    worker side), or by hand with ``client.register_plugin(ContextRouter())``
    followed by the ``dask_context_register`` handler. Registering it again is a
    no-op (``idempotent``), so every client of a shared cluster may do it.
    """

    name = "dask-context"
    idempotent = True

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None

    # ------------------------------------------------------------ lifecycle
    async def start(self, scheduler: Scheduler) -> None:
        _compat.check_version()
        self.scheduler = scheduler
        self.specs: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, list[tuple[Any, Hashable]]] = defaultdict(list)
        self.queued: dict[str, Counter[str]] = defaultdict(Counter)
        self.allowed: dict[str, set[str]] = defaultdict(set)
        self.assigned: dict[Hashable, tuple[str, str]] = {}
        self.inflight: Counter[str] = Counter()
        self.budget: dict[str, float] = {}
        self.resident: dict[str, dict[str, int]] = defaultdict(dict)
        self.warming: dict[str, dict[str, float]] = defaultdict(dict)
        self.last_used: dict[str, dict[str, float]] = defaultdict(dict)
        self.idle_since: dict[str, float] = {}
        self.load_time: dict[str, float] = {}
        self.nbytes: dict[str, int] = {}
        self.durations: dict[str, float] = {}
        self.load_keys: dict[Hashable, float] = {}
        self.stats = ContextStats()
        self._unknown_warned: set[str] = set()
        self._wake_pending = False
        self._replan_wanted = True
        self.prefetch = int(config.get("scheduler.prefetch"))
        self.default_load_time = parse_timedelta(config.get("scheduler.default-load-time"))
        self.keep_warm = parse_timedelta(config.get("adaptive.keep-warm"))
        self.startup_time = parse_timedelta(config.get("adaptive.startup-time"))
        self.unknown_duration = parse_timedelta(
            dask.config.get("distributed.scheduler.unknown-task-duration")
        )

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
                "dask_context_report": self.report,
                "dask_context_target": self.adaptive_target,
            }
        )
        interval = parse_timedelta(config.get("scheduler.interval")) * 1000
        pc = PeriodicCallback(self._periodic, interval)
        scheduler.periodic_callbacks["dask-context"] = pc
        pc.start()
        self._collector = register_collector(self)

    async def close(self) -> None:
        if self.scheduler is None:
            return
        self.scheduler.set_metadata(ROUTER_METADATA, False)
        pc = self.scheduler.periodic_callbacks.pop("dask-context", None)
        if pc is not None:
            pc.stop()
        unregister_collector(self._collector)

    # ------------------------------------------------------------ handlers
    def register(self, specs: list[dict[str, Any]], replace: bool = False, known_ok: bool = False) -> list[str]:
        """Scheduler handler: learn the contexts workers can load.

        Parameters
        ----------
        specs
            ``ContextSpec.info()`` of each context.
        replace
            Replace contexts registered under the same names.
        known_ok
            Skip names already registered (worker plugins announcing themselves).

        Raises
        ------
        DuplicateContextError
            If a name is already registered and neither flag is set.
        """
        if known_ok:
            specs = [info for info in specs if info["name"] not in self.specs]
        for info in specs:
            if info["name"] in self.specs and not replace:
                raise DuplicateContextError(
                    f"context {info['name']!r} is already registered on this cluster; "
                    "pass replace=True to replace it"
                )
        for info in specs:
            self.specs[info["name"]] = dict(info)
            if info.get("memory") is not None:
                self.nbytes[info["name"]] = int(info["memory"])
        self._wake(replan=True)
        return sorted(self.specs)

    def report(self) -> dict[str, Any]:
        """Scheduler handler: plain-data summary of every context and worker."""
        s = self.stats
        contexts = {}
        for c in sorted(self.specs):
            contexts[c] = {
                "loads": s.loads[c],
                "load_seconds": s.load_seconds[c],
                "load_time": self.load_time.get(c),
                "nbytes": self.nbytes.get(c),
                "evictions": s.evictions[c],
                "failures": s.failures[c],
                "tasks": s.tasks[c],
                "warmups": s.warmups[c],
                "requeued": s.requeued[c],
                "queued": sum(self.queued[c].values()),
                "warm": sorted(w for w, held in self.resident.items() if c in held),
                "allowed": sorted(self.allowed[c]),
            }
        workers = {
            w: {
                "budget": self.budget.get(w),
                "resident": dict(self.resident.get(w, {})),
                "inflight": self.inflight[w],
            }
            for w in sorted(self.scheduler.workers)
        }
        return {"contexts": contexts, "workers": workers}

    # ------------------------------------------------------------ graph intake
    def update_graph(self, scheduler: Scheduler, *, annotations: dict[str, dict] | None = None, **kwargs: Any) -> None:
        """Park every new context task before the scheduler places it."""
        for key, name in (annotations or {}).get("context", {}).items():
            if not self._known(name):
                continue
            ts = scheduler.tasks.get(key)
            if ts is not None and ts.state == "released" and ts.run_spec is not None:
                _compat.park(ts)

    def _known(self, name: Any) -> bool:
        if isinstance(name, str) and name in self.specs:
            return True
        if repr(name) not in self._unknown_warned:
            self._unknown_warned.add(repr(name))
            logger.warning(
                "Tasks ask for context %r, which is not registered (known: %s); they "
                "run unrouted and get_context() will raise UnknownContextError",
                name, sorted(self.specs),
            )
        return False

    def _context_of(self, key: Hashable) -> tuple[TaskState, str] | tuple[None, None]:
        ts = self.scheduler.tasks.get(key)
        if ts is None or not ts.annotations:
            return None, None
        name = ts.annotations.get("context")
        if isinstance(name, str) and name in self.specs:
            return ts, name
        return None, None

    def transition(self, key: Hashable, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "processing":
            placed = self.assigned.pop(key, None)
            if placed is not None:
                worker, name = placed
                self.inflight[worker] -= 1
                if finish == "memory":
                    self._finished(key, worker, name, kwargs.get("startstops"))
                elif finish == "released":
                    self.stats.requeued[name] += 1
                self._wake()
        if start == "no-worker":
            ts, name = self._context_of(key)
            if name is not None and self.queued[name][ts.prefix.name] > 0:
                self.queued[name][ts.prefix.name] -= 1
        if finish == "no-worker":
            ts, name = self._context_of(key)
            if name is not None:
                heapq.heappush(self.queues[name], (ts.priority, key))
                self.queued[name][ts.prefix.name] += 1
                # a context nobody serves yet needs a plan now, not at the next tick
                self._wake(replan=not self.allowed[name])
        elif finish == "processing":
            ts, name = self._context_of(key)
            if name is not None and ts.processing_on is not None:
                worker = ts.processing_on.address
                self.assigned[key] = (worker, name)
                self.inflight[worker] += 1
                self.idle_since.pop(worker, None)
        elif finish == "forgotten":
            self.load_keys.pop(key, None)

    def _finished(self, key: Hashable, worker: str, name: str, startstops: Any) -> None:
        self.stats.tasks[name] += 1
        now = time.monotonic()
        self.last_used[worker][name] = now
        if not self.inflight[worker]:
            self.idle_since[worker] = now
        seconds = _compat.compute_seconds(startstops)
        if seconds is None:
            return
        # the task that loaded the context ran longer by the load time: take it out
        seconds = max(0.0, seconds - self.load_keys.pop(key, 0.0))
        prefix = self.scheduler.tasks[key].prefix.name
        self.durations[prefix] = _ema(self.durations.get(prefix), seconds)

    # ------------------------------------------------------------ worker events
    def log_event(self, topic: str, msg: Any) -> None:
        if topic != TOPIC or not isinstance(msg, dict):
            return
        worker = msg.get("worker")
        if worker not in self.scheduler.workers:
            return
        action = msg.get("action")
        name = msg.get("context")
        if action == "hello":
            self.budget[worker] = float(msg["budget"])
        elif action == "loading":
            self.warming[worker][name] = time.monotonic()
            self.allowed[name].add(worker)
        elif action == "loaded":
            self.warming[worker].pop(name, None)
            self.allowed[name].add(worker)
            self.stats.loads[name] += 1
            self.stats.load_seconds[name] += msg["seconds"]
            self.load_time[name] = _ema(self.load_time.get(name), msg["seconds"])
            self.nbytes[name] = max(self.nbytes.get(name, 0), int(msg["nbytes"]))
            if msg.get("key") is not None:
                self.load_keys[_key(msg["key"])] = msg["seconds"]
        elif action == "evicted":
            self.allowed[name].discard(worker)
            self.stats.evictions[name] += 1
        elif action == "failed":
            self.warming[worker].pop(name, None)
            self.stats.failures[name] += 1
        if "resident" in msg:
            self.resident[worker] = dict(msg["resident"])
        self._wake(replan=True)

    # ------------------------------------------------------------ membership
    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self.idle_since[worker] = time.monotonic()
        self._wake(replan=True)

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        for allowed in self.allowed.values():
            allowed.discard(worker)
        for table in (self.budget, self.resident, self.warming, self.last_used, self.idle_since):
            table.pop(worker, None)
        self.inflight.pop(worker, None)
        self._wake(replan=True)

    # ------------------------------------------------------------ routing
    def _wake(self, replan: bool = False) -> None:
        """Feed workers (and re-plan first, if asked) once the current handler ends."""
        self._replan_wanted |= replan
        if not self._wake_pending:
            self._wake_pending = True
            self.scheduler.loop.add_callback(self._run)

    def _periodic(self) -> None:
        self._replan_wanted = True
        self._run()

    def _run(self) -> None:
        self._wake_pending = False
        if self._replan_wanted:
            self._replan_wanted = False
            self._replan()
        self._feed()

    def _head(self, name: str) -> TaskState | None:
        """Most urgent task still waiting in ``name``'s queue (drops stale entries)."""
        queue = self.queues[name]
        while queue:
            ts = self.scheduler.tasks.get(queue[0][1])
            if ts is not None and ts.state == "no-worker":
                return ts
            heapq.heappop(queue)
        return None

    def _views(self, routing: bool = True) -> tuple[dict[str, ContextView], dict[str, WorkerView]]:
        """Plain-data views for the policies.

        ``routing`` discounts unmeasured task durations while a measurement is due
        (see :meth:`_duration`); scaling must not, or adapt would cancel the jobs it
        has just asked for whenever a first load outlasts its ``wait_count``.
        """
        running = {ws.address: ws for ws in _compat.running_workers(self.scheduler)}
        contexts = {}
        inflight = {name for _, name in self.assigned.values()}
        for c in self.specs:
            head = self._head(c)
            counts = self.queued[c]
            # a measured load against a guessed duration would warm workers on no
            # evidence; guesses on both sides (before the first load) are comparable
            measuring = routing and c in inflight and c in self.load_time
            contexts[c] = ContextView(
                queued=sum(counts.values()),
                backlog=sum(n * self._duration(p, measuring) for p, n in counts.items()),
                load_time=self._load_time(c),
                nbytes=self.nbytes.get(c, 0),
                allowed=frozenset(self.allowed[c]),
                first=head.priority if head is not None else (),
            )
        workers = {}
        for w, ws in running.items():
            held = {
                c: Resident(n, self.last_used[w].get(c, 0.0))
                for c, n in self.resident.get(w, {}).items()
            }
            for c in self.warming.get(w, {}):
                held.setdefault(c, Resident(self.nbytes.get(c, 0), math.inf))
            workers[w] = WorkerView(
                budget=self.budget.get(w, math.inf),
                resident=held,
                inflight=_compat.processing_count(ws),
            )
        return contexts, workers

    def _duration(self, prefix: str, measuring: bool) -> float:
        """Estimated seconds of a task of ``prefix``.

        An unknown duration counts as distributed's ``unknown-task-duration``, except
        (``measuring``) when the context's load time is already measured and one of
        its tasks is running: its duration is due soon.
        """
        known = self.durations.get(prefix)
        if known is not None:
            return known
        return 0.0 if measuring else self.unknown_duration


    def _load_time(self, name: str) -> float:
        if name in self.load_time:
            return self.load_time[name]
        hint = self.specs[name].get("load_time")
        return self.default_load_time if hint is None else hint

    def _replan(self) -> None:
        contexts, workers = self._views()
        plan = plan_routes(contexts, workers)
        now = time.monotonic()
        for name, added in plan.add.items():
            for w in added:
                if name not in self.resident.get(w, {}):
                    self.warming[w][name] = now
                    self.stats.warmups[name] += 1
                logger.debug("Context %r may now run on %s", name, w)
            self.allowed[name] |= added
        for w, evicted in plan.evict.items():
            for name in evicted:
                self.allowed[name].discard(w)

    def _feed(self) -> None:
        """Hand queued context tasks to allowed workers with free slots."""
        serving: dict[str, list[str]] = defaultdict(list)
        waiting: dict[str, int] = {}
        for name, workers in self.allowed.items():
            if self._head(name) is not None:
                waiting[name] = sum(self.queued[name].values())
                for w in workers:
                    serving[w].append(name)
        placements: list[tuple[TaskState, str]] = []
        placed: set[Hashable] = set()
        for ws in _compat.running_workers(self.scheduler):
            names = serving.get(ws.address)
            if not names:
                continue
            # prefetch only while there is work for every worker serving these
            # contexts: at the tail, a prefetched task would wait behind a running
            # one while another warm worker idles
            queued = sum(waiting[c] for c in names)
            peers = len(set().union(*(self.allowed[c] for c in names)))
            extra = self.prefetch if queued > peers else 0
            free = ws.nthreads + extra - self.inflight[ws.address]
            while names and free > 0:
                heads = [(ts.priority, c) for c in names if (ts := self._head(c))]
                if not heads:
                    break
                _, c = min(heads)
                _, key = heapq.heappop(self.queues[c])
                if key not in placed:
                    placed.add(key)
                    placements.append((self.scheduler.tasks[key], ws.address))
                    free -= 1
        if not placements:
            return
        stimulus_id = f"dask-context-feed-{time.time()}"
        for ts in _compat.send(self.scheduler, placements, stimulus_id):
            heapq.heappush(self.queues[self._context_of(ts.key)[1]], (ts.priority, ts.key))

    # ------------------------------------------------------------ adaptive
    def valid_workers_downscaling(self, scheduler: Scheduler, workers: list[WorkerState]) -> list[WorkerState]:
        """Keep warm workers out of scale-in while they are worth keeping.

        Any scale-in that goes through ``Scheduler.workers_to_close`` (``Adaptive``,
        dask-jobqueue's ``adapt``, ``retire_workers(n=...)``) asks this. Busy workers,
        workers warm for a context with queued work, and warm workers idle for less
        than ``dask-context.adaptive.keep-warm`` stay. While a cold worker may go,
        warm ones wait for a later round: cold workers are retired first.
        """
        contexts, _ = self._views()
        wanted = {c for c, v in contexts.items() if v.queued}
        now = time.monotonic()
        views = {
            ws.address: RetireView(
                idle=not _compat.processing_count(ws),
                warm=frozenset(self.resident.get(ws.address, {})),
                idle_for=now - self.idle_since.get(ws.address, now),
                nbytes=_compat.results_nbytes(ws),
            )
            for ws in workers
        }
        order = retire_order(views, wanted, self.keep_warm)
        cold = {w for w in order if not views[w].warm}
        keep = cold or set(order)
        return [ws for ws in workers if ws.address in keep]

    def adaptive_target(self, target_duration: float | str | None = None, startup: float | None = None) -> int:
        """Scheduler handler: workers wanted, counting load (and start-up) time.

        Context work asks for :func:`dask_context.policy.workers_wanted`; other work
        for what the scheduler's own ``adaptive_target`` says.
        """
        s = self.scheduler
        if target_duration is None:
            target_duration = dask.config.get("distributed.adaptive.target-duration")
        target_duration = parse_timedelta(target_duration)
        contexts, _ = self._views(routing=False)
        startup = self.startup_time if startup is None else startup
        wanted = workers_wanted(contexts, startup, target_duration)
        ours = sum(v.queued for v in contexts.values()) + sum(self.inflight.values())
        if _compat.non_context_ready(s, ours) > 0:
            wanted = max(wanted, s.adaptive_target(target_duration))
        if wanted < len(s.workers):
            # like the scheduler's own target: keep workers holding results that
            # clients still want (and, through our downscaling filter, warm ones)
            wanted = max(wanted, len(s.workers) - len(s.workers_to_close()))
        return wanted
