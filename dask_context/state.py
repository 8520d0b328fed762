"""The router's state: one record per worker, per context and per routed task.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.

:class:`RouterState` is plain data with one method for each way a record comes or
goes (a context registered or removed, a worker joining or leaving, a task routed,
queued, sent, finished or forgotten), so that nothing is left behind when a worker,
context or task goes away. It knows nothing of the scheduler: the plugin in
:mod:`dask_context.scheduler` calls these methods from its hooks and hands the
policies in :mod:`dask_context.policy` views built from here.

Examples
--------
>>> state = RouterState()
>>> ctx = state.add_context({"name": "A", "token": "t1"})
>>> w = state.add_worker("tcp://w1", nthreads=1)
>>> task = state.route("x-1", "A", group="x", prefix="x", priority=(0,))
>>> state.enqueue(task)
>>> state.pop_head(ctx) is task
True
>>> state.sent(task, "tcp://w1"); w.tasks
{'A': {'x-1'}}
>>> state.left_worker(task) is w
True
>>> state.forget("x-1") is task, w.tasks, state.tasks
(True, {}, {})
>>> state.remove_worker("tcp://w1"); state.workers
{}
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: upper bounds (seconds) of the load and unload latency histograms
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf)


def observe(buckets: list[int], seconds: float) -> None:
    """Count ``seconds`` in the first of :data:`LATENCY_BUCKETS` it fits.

    >>> b = [0] * len(LATENCY_BUCKETS); observe(b, 0.3); observe(b, 1e9); b[4], b[-1]
    (1, 1)
    """
    buckets[next(i for i, le in enumerate(LATENCY_BUCKETS) if seconds <= le)] += 1


def _buckets() -> list[int]:
    return [0] * len(LATENCY_BUCKETS)


@dataclass(eq=False, slots=True)
class RoutedTask:
    """A task the router is responsible for placing."""

    key: Hashable
    context: str
    group: str
    prefix: str
    priority: tuple
    #: the worker it was sent to, while it is processing there
    worker: str | None = None
    #: times it was sent to a worker (a second entry into the queue is a requeue)
    sent: int = 0
    #: heap entry sequence number while it waits in its context's queue, else None
    seq: int | None = None
    #: seconds it spent loading the context (it found it cold), else None
    load_seconds: float | None = None
    #: what it asks for with ``resources=`` (empty: nothing), as a key of
    #: :attr:`ContextRecord.by_resources`
    resources: tuple = ()


@dataclass(eq=False)
class WorkerRecord:
    """What the router knows of one worker."""

    address: str
    nthreads: int = 1
    #: bytes of contexts it may hold; None until its plugins announce it
    budget: float | None = None
    #: batch job (``SLURM_JOB_ID`` and the like): scale-in keeps or retires a job whole
    job: str | None = None
    #: contexts whose worker plugin is set up here, with the token of their spec
    specs: dict[str, str] = field(default_factory=dict)
    resident: dict[str, int] = field(default_factory=dict)
    #: contexts kept in host memory after leaving its GPU (they re-warm by a copy)
    host: dict[str, int] = field(default_factory=dict)
    loading: set[str] = field(default_factory=set)
    #: contexts the router chose this worker to warm, and since when
    chosen: dict[str, float] = field(default_factory=dict)
    #: chosen contexts the worker was asked to load
    asked: set[str] = field(default_factory=set)
    #: contexts the router asked this worker to evict (the reply is pending)
    evicting: set[str] = field(default_factory=set)
    last_used: dict[str, float] = field(default_factory=dict)
    #: context -> keys sent here and not finished
    tasks: dict[str, set[Hashable]] = field(default_factory=dict)
    #: context -> when its load last failed here
    failed: dict[str, float] = field(default_factory=dict)
    idle_since: float = field(default_factory=time.monotonic)
    #: the worker was told it will be preempted: it takes no new context tasks
    draining: bool = False
    #: sequence number of the newest snapshot of the worker's contexts applied here
    seq: int = 0
    joined: float = field(default_factory=time.monotonic)

    def unchoose(self, name: str) -> None:
        """The worker is no longer to warm ``name`` (it did, or the plan changed)."""
        self.chosen.pop(name, None)
        self.asked.discard(name)

    def holds(self, name: str) -> bool:
        return name in self.resident or name in self.loading

    def inflight(self, name: str | None = None) -> int:
        if name is not None:
            return len(self.tasks.get(name, ()))
        return sum(map(len, self.tasks.values()))


@dataclass(eq=False)
class ContextRecord:
    """What the router knows of one context."""

    name: str
    token: str
    #: a digest per spec field, to say what differs when a spec is replaced
    fields: dict[str, str] = field(default_factory=dict)
    #: the spec's estimates (``memory`` in bytes, ``load_time`` in seconds)
    memory: int | None = None
    load_time_hint: float | None = None
    #: heaps of (priority, seq, task) of the tasks waiting for a worker, one per
    #: ``resources=`` request (the empty request included): a task that asks for
    #: resources no free worker has never stands in front of tasks that ask for none
    queues: dict[tuple, list[tuple[tuple, int, RoutedTask]]] = field(default_factory=dict)
    waiting: int = 0
    #: when its queue last became non-empty (None while empty)
    since: float | None = None
    #: when one of its tasks was last sent to a worker, or the stall guard acted
    progress: float = 0.0
    #: times the stall guard acted since its tasks last moved (see ContextRouter._guard)
    stalls: int = 0
    #: waiting tasks per task prefix (their durations are estimated per prefix)
    by_prefix: Counter[str] = field(default_factory=Counter)
    #: waiting tasks per ``resources=`` request (the empty request included)
    by_resources: Counter[tuple] = field(default_factory=Counter)
    allowed: set[str] = field(default_factory=set)
    #: workers without this spec set up (another token, or none): they cannot serve it
    lacking: set[str] = field(default_factory=set)
    #: measured: exponential average of load seconds, latest size in bytes
    load_time: float | None = None
    nbytes: int | None = None
    #: worker -> when its load failed, kept for failed-load-retry (departed ones too)
    failed_on: dict[str, float] = field(default_factory=dict)
    #: the last load failure, as the worker sent it (pickled exception, traceback, texts)
    error: dict[str, Any] | None = None
    #: node-local copies of its files (``ContextSpec.files``): worker -> node
    staged: dict[str, str] = field(default_factory=dict)
    #: the worker copying its files from ``files`` now; the others wait for its copy
    reader: str | None = None
    files: str | None = None
    loads: int = 0
    #: warm-ups from a worker's host-memory copy (a copy to the GPU, not a load)
    rewarms: int = 0
    load_seconds: float = 0.0
    load_buckets: list[int] = field(default_factory=_buckets)
    evictions: int = 0
    unload_seconds: float = 0.0
    unload_buckets: list[int] = field(default_factory=_buckets)
    failures: int = 0
    #: workers that died while loading it (see load-deaths)
    deaths: int = 0
    #: of those, the ones since its last completed load
    dying: int = 0
    tasks: int = 0
    hits: int = 0
    warmups: int = 0
    requeued: int = 0

    def size(self, underestimate: float = 1.0) -> int | None:
        """Measured size, else the spec's estimate (times ``underestimate``, see
        :func:`underestimate`), else None (unknown)."""
        if self.nbytes is not None:
            return self.nbytes
        return None if self.memory is None else int(self.memory * underestimate)


def underestimate(declared_and_measured: Iterable[tuple[int | None, int | None]]) -> float:
    """How much declared sizes fell short of measured ones, at worst (1 if never).

    A user who declared one context at a tenth of its size likely did the same for
    the others: their estimates are scaled up by as much until they are measured.

    >>> underestimate([(10, 100), (None, 5), (50, 40)]), underestimate([])
    (10.0, 1.0)
    """
    ratios = [m / d for d, m in declared_and_measured if d and m is not None and m > d]
    return max(ratios, default=1.0)


class RouterState:
    """Records of contexts, workers and routed tasks, and every change to them."""

    def __init__(self) -> None:
        self.contexts: dict[str, ContextRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.tasks: dict[Hashable, RoutedTask] = {}
        #: contexts with tasks waiting, and contexts whose load failed lately: the
        #: routing loop looks at these instead of at every context
        self.queued: set[str] = set()
        self.failing: set[str] = set()
        self._seq = itertools.count()

    # ------------------------------------------------------------ contexts
    def add_context(self, info: dict[str, Any]) -> ContextRecord:
        """Add (or replace) a context from ``ContextSpec.info()``."""
        old = self.contexts.get(info["name"])
        ctx = ContextRecord(
            info["name"], info["token"], dict(info.get("fields", {})), info.get("memory"),
            info.get("load_time"), files=info.get("files"),
        )
        if old is not None:
            # a new spec under the same name: warm copies are of the old one and
            # the workers' plugins are being replaced; queued tasks carry over
            ctx.queues, ctx.waiting, ctx.by_prefix, ctx.by_resources = (
                old.queues, old.waiting, old.by_prefix, old.by_resources)
        ctx.lacking = {a for a, w in self.workers.items() if w.specs.get(ctx.name) != ctx.token}
        self.contexts[ctx.name] = ctx
        self.failing.discard(ctx.name)
        return ctx

    def remove_context(self, name: str) -> list[RoutedTask]:
        """Drop a context everywhere; return its tasks (the caller fails or frees them)."""
        self.contexts.pop(name)
        self.queued.discard(name)
        self.failing.discard(name)
        for w in self.workers.values():
            for table in (w.specs, w.resident, w.host, w.chosen, w.last_used, w.tasks, w.failed):
                table.pop(name, None)
            w.loading.discard(name)
            w.evicting.discard(name)
            w.asked.discard(name)
        tasks = [t for t in self.tasks.values() if t.context == name]
        for t in tasks:
            del self.tasks[t.key]
        return tasks

    # ------------------------------------------------------------ workers
    def add_worker(self, address: str, nthreads: int) -> WorkerRecord:
        w = self.workers.get(address)
        if w is None:
            w = self.workers[address] = WorkerRecord(address, nthreads)
            now = time.monotonic()
            for ctx in self.contexts.values():
                ctx.lacking.add(address)
                if ctx.waiting:
                    # the stall guard's clock starts again: waiting for a worker
                    # that can serve it (one with the resources asked) is no stall
                    ctx.progress = max(ctx.progress, now)
        return w

    def set_specs(self, w: WorkerRecord, specs: dict[str, str]) -> None:
        """The specs set up on ``w`` (name -> token), as the worker says."""
        w.specs = specs
        for ctx in self.contexts.values():
            if specs.get(ctx.name) == ctx.token:
                ctx.lacking.discard(w.address)
            else:
                ctx.lacking.add(w.address)

    def remove_worker(self, address: str) -> None:
        """Forget a worker; its tasks come back through the scheduler as usual."""
        w = self.workers.pop(address, None)
        if w is None:
            return
        for ctx in self.contexts.values():
            ctx.allowed.discard(address)
            ctx.lacking.discard(address)
            ctx.staged.pop(address, None)
            if ctx.reader == address:
                ctx.reader = None
        for keys in w.tasks.values():
            for key in keys:
                task = self.tasks.get(key)
                if task is not None and task.worker == address:
                    task.worker = None

    def exclude(self, ctx: ContextRecord, address: str, when: float) -> None:
        """A load of ``ctx`` failed on ``address``: it stops serving the context."""
        ctx.failed_on[address] = when
        self.failing.add(ctx.name)
        ctx.allowed.discard(address)
        w = self.workers.get(address)
        if w is not None:
            w.failed[ctx.name] = when
            w.unchoose(ctx.name)
            w.loading.discard(ctx.name)

    def expire_failures(self, now: float, retry: float) -> None:
        for name in list(self.failing):
            ctx = self.contexts[name]
            for address, when in list(ctx.failed_on.items()):
                if now - when >= retry:
                    del ctx.failed_on[address]
                    w = self.workers.get(address)
                    if w is not None:
                        w.failed.pop(ctx.name, None)
            if not ctx.failed_on:
                self.failing.discard(name)

    # ------------------------------------------------------------ tasks
    def route(self, key: Hashable, context: str, group: str, prefix: str, priority: tuple,
              resources: tuple = ()) -> RoutedTask:
        task = self.tasks[key] = RoutedTask(key, context, group, prefix, priority, resources=resources)
        return task

    def enqueue(self, task: RoutedTask) -> None:
        """The task waits for a worker (it entered ``no-worker``)."""
        if task.seq is not None:
            return
        ctx = self.contexts[task.context]
        task.seq = next(self._seq)
        heapq.heappush(ctx.queues.setdefault(task.resources, []), (task.priority, task.seq, task))
        if not ctx.waiting:
            ctx.since = time.monotonic()
            self.queued.add(ctx.name)
        ctx.waiting += 1
        ctx.by_prefix[task.prefix] += 1
        ctx.by_resources[task.resources] += 1
        if task.sent:
            ctx.requeued += 1

    def dequeue(self, task: RoutedTask) -> None:
        """The task left the queue; its heap entry goes stale and is skipped."""
        if task.seq is None:
            return
        task.seq = None
        ctx = self.contexts.get(task.context)
        if ctx is None:
            return
        ctx.waiting -= 1
        for counts, kind in ((ctx.by_prefix, task.prefix), (ctx.by_resources, task.resources)):
            counts[kind] -= 1
            if not counts[kind]:
                del counts[kind]
        if not ctx.by_resources.get(task.resources):
            ctx.queues.pop(task.resources, None)
        if not ctx.waiting:
            ctx.since = None
            self.queued.discard(ctx.name)

    def head(self, ctx: ContextRecord,
             fits: Callable[[tuple], bool] | None = None) -> RoutedTask | None:
        """The most urgent waiting task of ``ctx``, among those whose ``resources=``
        request ``fits`` accepts (all, by default; a task asking for none always
        fits). Stale heap entries are dropped on the way.

        Examples
        --------
        >>> state = RouterState()
        >>> ctx = state.add_context({"name": "A", "token": "t"})
        >>> for key, priority, resources in [("gpu", (0,), (("GPU", 1),)), ("any", (1,), ())]:
        ...     state.enqueue(state.route(key, "A", key, key, priority, resources))
        >>> state.head(ctx).key, state.head(ctx, fits=lambda request: False).key
        ('gpu', 'any')
        """
        best = None
        for request, queue in ctx.queues.items():
            if request and fits is not None and not fits(request):
                continue
            while queue:
                _, seq, task = queue[0]
                if task.seq == seq and self.tasks.get(task.key) is task:
                    if best is None or (task.priority, seq) < (best.priority, best.seq):
                        best = task
                    break
                heapq.heappop(queue)
        return best

    def pop_head(self, ctx: ContextRecord,
                 fits: Callable[[tuple], bool] | None = None) -> RoutedTask | None:
        """Take :meth:`head` out of the queue."""
        task = self.head(ctx, fits)
        if task is not None:
            heapq.heappop(ctx.queues[task.resources])
            self.dequeue(task)
        return task

    def waiting_tasks(self, ctx: ContextRecord) -> Iterator[RoutedTask]:
        for queue in list(ctx.queues.values()):
            for _, seq, task in list(queue):
                if task.seq == seq and self.tasks.get(task.key) is task:
                    yield task

    def sent(self, task: RoutedTask, address: str) -> None:
        """The task is processing on ``address``."""
        if task.seq is not None:
            self.dequeue(task)
        task.worker = address
        task.sent += 1
        ctx = self.contexts.get(task.context)
        if ctx is not None:
            ctx.progress, ctx.stalls = time.monotonic(), 0
        w = self.workers.get(address)
        if w is not None:
            keys = w.tasks.get(task.context)
            if keys is None:
                keys = w.tasks[task.context] = set()
            keys.add(task.key)

    def left_worker(self, task: RoutedTask) -> WorkerRecord | None:
        """The task stopped processing (finished, failed, released); return its worker."""
        address, task.worker = task.worker, None
        w = self.workers.get(address) if address is not None else None
        if w is not None:
            keys = w.tasks.get(task.context)
            if keys is not None:
                keys.discard(task.key)
                if not keys:
                    del w.tasks[task.context]
            if not w.tasks:
                w.idle_since = time.monotonic()
        return w

    def forget(self, key: Hashable) -> RoutedTask | None:
        """The router is no longer responsible for ``key``."""
        task = self.tasks.pop(key, None)
        if task is not None:
            if task.seq is not None:
                self.dequeue(task)
            if task.worker is not None:
                self.left_worker(task)
        return task
