"""The router's Dask hooks: what feeds its state.

``update_graph`` parks new tasks that need a context (with the marks and learned
groups of :mod:`._router_learning`), ``transition`` follows routed tasks through
the queue, to a worker and out, ``log_event`` takes what workers report (loads,
evictions, failed loads, staged files, tasks that use or ignore a context) and how
workers leave (dying while loading a context), and ``add_worker`` /
``remove_worker`` follow the cluster's membership. Each hook is
fail-safe: an error hands the tasks concerned back to Dask
(:meth:`~._router_guard.GuardMixin._fail_safe`). Each ends by waking the routing
loop (:mod:`._router_loop`).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from dask_context import _compat, graph
from dask_context._protocol import TOPIC, plugin_name
from dask_context._router_base import RouterBase, logger
from dask_context.errors import WorkerDiedLoadingError, error_payload
from dask_context.state import RoutedTask, WorkerRecord, observe

if TYPE_CHECKING:
    from distributed import Scheduler


#: the statuses a worker announces when it closes in order
LEAVING = ("closing", "closing_gracefully")


def _ema(old: float | None, new: float, weight: float = 0.3) -> float:
    """Exponential moving average; the first sample stands alone.

    >>> _ema(None, 4.0), _ema(4.0, 2.0)
    (4.0, 3.4)
    """
    return new if old is None else (1 - weight) * old + weight * new

def _key(key: Any) -> Hashable:
    """Task keys arrive from workers as lists after msgpack; make them keys again."""
    return tuple(_key(k) for k in key) if isinstance(key, list) else key


class IntakeMixin(RouterBase):
    """The router's Dask hooks.

    Owns the measured task durations: ``durations`` (seconds per task prefix, a
    moving average) and ``typical_duration`` (of every context task seen), which
    :mod:`._router_views` turns into backlogs, and the workers that said they are
    closing (``_closing``).
    """

    def _init_intake(self) -> None:
        self.durations: dict[str, float] = {}
        self.typical_duration: float | None = None
        # workers that said they are closing: they leave in order, they do not die
        self._closing: set[str] = set()

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
            if not self.state.contexts:
                return
            for key in tasks:
                ts = scheduler.tasks.get(key)
                if ts is None or ts.key in self.state.tasks:
                    continue
                # DataFrames keep no annotations: the mark is on the user's function
                # in the task's spec (graph.Routed), however dask-expr fused it;
                # unmarked tasks of a group known to call get_context are routed too
                name = graph.marked_context(ts.run_spec)
                if name is not None and not self._known(name, client):
                    continue
                name = name or self.learned.get(ts.group.name)
                if name is not None and self._routable(ts, client):
                    self._route(ts, name, annotate=True)
                    routed.append(key)
        except Exception:
            self._fail_safe("update_graph", routed)

    def transition(self, key: Hashable, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        # every transition of every task comes here, six or more per routed task:
        # the body is inline, a call less each time
        st = self.state
        task = st.tasks.get(key)
        if task is None:
            return
        try:
            if start == "processing":
                w = st.left_worker(task)
                if finish == "memory":
                    self._finished(task, w, kwargs.get("startstops"))
                if w is not None:
                    self.wake(worker=w.address)
            elif start == "no-worker":
                st.dequeue(task)
            if finish == "processing":
                ws = self.scheduler.tasks[key].processing_on
                if ws is not None:
                    st.sent(task, ws.address)
            elif finish == "no-worker":
                _compat.park(self.scheduler.tasks[key])  # a placement that did not happen leaves {address}
                st.enqueue(task)
                ctx = st.contexts[task.context]
                if ctx.waiting == 1:
                    self.replan_when_settled()
                # a context nobody serves yet needs a plan now, not at the next tick
                self.wake(replan=not ctx.allowed, context=task.context)
            elif finish == "released":
                # lost with its worker, sent back after a failed load, or cancelled:
                # if it runs again, it comes back through the queue
                _compat.park(self.scheduler.tasks[key])
            elif finish == "forgotten":
                st.forget(key)
        except Exception:
            self._fail_safe("transition", [key])

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

    def log_event(self, topic: str, msg: Any) -> None:
        if not isinstance(msg, dict):
            return
        try:
            if topic == TOPIC:
                self._event(msg)
            elif msg.get("action") == "worker-status-change" and topic in self.state.workers:
                # the topic is the worker's address
                if msg.get("status") in LEAVING:
                    self._closing.add(topic)
                else:  # a retirement that could not move the worker's data: it stays
                    self._closing.discard(topic)
            elif topic == "all" and msg.get("action") == "remove-worker":
                # logged by the scheduler just before remove_worker, while the record
                # of what the worker was loading is still here
                self._left(msg.get("worker"), bool(msg.get("expected")))
        except Exception:
            self._fail_safe("log_event", self._all_waiting())

    def _left(self, address: str | None, expected: bool) -> None:
        """A worker left: if it died (it did not close in order), each load in flight
        there failed.

        A loader that kills its worker (out of memory, a crash in native code) runs
        with no task on the worker, so Dask counts no failure; counted here, its
        context's tasks fail after ``load-deaths`` deaths since it last loaded, once
        no worker holds it, instead of waiting through the nanny's restarts forever
        (the workers it loaded on may have left since, the ones it kills stayed). A
        load that completes starts the count again: a preemption storm kills workers
        mid-load too, several in a row when loads are long, and a loader that works
        is no loader that kills every worker (its tasks rerun, as Dask reruns those
        of a lost worker); while a worker holds the context, its tasks run there.
        A worker that said it was closing (``client.restart()``, a retirement, a
        drain) did not die; one its nanny terminates for its memory dies
        (:mod:`dask_context.preemption` does not drain it).
        """
        closing = address in self._closing
        self._closing.discard(address)
        w = self.state.workers.get(address)
        if w is None or expected or closing or w.draining:
            return
        for name in {*w.loading, *(c for c in w.asked if c not in w.resident)}:
            ctx = self.state.contexts.get(name)
            if ctx is None:
                continue
            ctx.deaths += 1
            ctx.dying += 1
            ctx.failures += 1
            ctx.error = error_payload(WorkerDiedLoadingError(
                f"{ctx.dying} worker(s) died while loading context {name!r} (out of memory, "
                f"a crash in native code, or killed) since it last loaded, the last "
                f"{w.address}: its tasks fail once dask-context.scheduler.load-deaths "
                "did and no worker holds it"))
            logger.warning("%s", ctx.error["exception_text"])
            held = any(name in o.resident or name in o.host
                       for o in self.state.workers.values() if o is not w)
            if ctx.dying >= self.death_limit and ctx.waiting and not held:
                # once the scheduler has handled the removal it is in the middle of
                self.scheduler.loop.add_callback(self._fail_queued, ctx, ctx.dying)

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
        if action == "removed" and plugin_name(name) not in self.scheduler.worker_plugins:
            # its worker plugin was unregistered by hand (client.unregister_worker_plugin):
            # no worker will load it again, so it is unregistered here too, and its
            # queued tasks fail now, as with dask_context.unregister
            logger.warning("The worker plugin of context %r was removed: unregistering it", name)
            self.unregister([name])
            return
        if action == "loaded":
            if msg.get("from") == "host":
                # a copy back from host memory says nothing of a load from storage
                ctx.rewarms += 1
            else:
                ctx.loads += 1
                ctx.dying = 0
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
