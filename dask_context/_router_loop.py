"""The router's routing loop: when to route, and acting on the policies' plans.

Hooks and handlers call :meth:`RoutingMixin.wake`; once the current handler ends,
``_run`` re-plans if asked (throttled: see the constants below), asks the workers
chosen to warm a context to load it (``_warm_up``) after the evictions the plan
implies (``_evict``), and hands queued tasks to workers with free slots (``_feed``).
``_periodic`` runs every ``scheduler.interval``: failure expiry, feeding workers
whose slots opened, reconcile, survey and stall guard (:mod:`._router_guard`).
The decisions themselves are :func:`dask_context.policy.plan_routes`'s, on the
views of :mod:`._router_views`.
"""

from __future__ import annotations

import functools
import math
import time
from typing import TYPE_CHECKING

from dask_context import _compat, config
from dask_context._router_base import RouterBase, logger
from dask_context.policy import plan_routes

if TYPE_CHECKING:
    from distributed.scheduler import TaskState, WorkerState

# a re-plan runs at most every scheduler.interval and REPLAN_SHARE times its own
# duration (2% of the scheduler's time: a plan of 1,000 workers takes milliseconds);
# one due to settled new work skips the interval; one for a context no worker
# serves waits only MIN_REPLAN_GAP s or URGENT_SHARE durations
REPLAN_SHARE = 50
MIN_REPLAN_GAP = 0.02
URGENT_SHARE = 5


class RoutingMixin(RouterBase):
    """The routing loop.

    Owns its settings (``prefetch``, ``interval``, ``settle``, ``retry``,
    ``reconcile_interval``) and the loop's bookkeeping: ``_wake_pending``,
    ``_replan_wanted``, ``_last_replan``, ``_replan_seconds``, ``_replan_due``
    (a re-plan owed once new work has settled), ``_ticks``, and the
    incremental sets ``_dirty_workers`` (workers to feed: their slots opened),
    ``_dirty_contexts`` (contexts with new tasks) and ``_free`` (workers known to
    have a free slot).
    """

    def _init_loop(self) -> None:
        self._wake_pending = False
        self._replan_wanted = True
        self._last_replan = -math.inf
        self._replan_seconds = 0.0
        # a re-plan due at this time whatever the interval: new work has settled
        self._replan_due = math.inf
        # workers to feed (their slots opened), contexts with new tasks, and
        # workers known to have a free slot
        self._dirty_workers: set[str] = set()
        self._dirty_contexts: set[str] = set()
        self._free: set[str] = set()
        self._ticks = 0
        self.prefetch = int(config.get("scheduler.prefetch"))
        self.interval = config.get_seconds("scheduler.interval")
        self.settle = config.get_seconds("scheduler.settle")
        self.retry = config.get_seconds("worker.failed-load-retry")
        self.reconcile_interval = config.get_seconds("scheduler.reconcile-interval")

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

    def replan_when_settled(self) -> None:
        """New work arrived for an idle context: spread it as soon as it has
        settled, not at the next tick (cold workers start loading then)."""
        due = time.monotonic() + self.settle
        if due < self._replan_due:
            self._replan_due = due
            self.scheduler.loop.call_later(self.settle, self.wake, True)

    def _periodic(self) -> None:
        if not self._still_installed():
            return
        self._ticks += 1
        now = time.monotonic()
        self.state.expire_failures(now, self.retry)
        # the scheduler's index of workers with a free slot, read once per tick
        free = _compat.free_workers(self.scheduler) if self.state.queued else []
        # queued work may be worth spreading as its backlog grows, onto a worker
        # that idles (the only ones a plan spreads to); otherwise only stale choices
        # and over-full workers are left to tidy, now and then
        self._replan_wanted |= self._ticks % 5 == 0 or (
            bool(self.state.queued) and (self._unserved() or self._spare_worker(free)))
        # workers whose slots opened without a routed task leaving them (plain tasks
        # finished there) are fed here, a few times a second while routed tasks wait;
        # those found free when last fed were fed since any of their contexts got tasks
        self._dirty_workers.update(ws.address for ws in free if ws.address not in self._free)
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
            now = time.monotonic()
            if self.state.failing:
                # a failure past failed-load-retry must not fail tasks that arrive
                # before the next tick forgets it
                self.state.expire_failures(now, self.retry)
                self._fail_hopeless()
            since = now - self._last_replan
            # a plan looks at every worker: on a large cluster it runs less often, so
            # that planning never takes more than a small share of the scheduler
            share = REPLAN_SHARE * self._replan_seconds
            if self._replan_wanted and (
                since >= max(self.interval, share)
                or (now >= self._replan_due and since >= max(MIN_REPLAN_GAP, share))
                or (since >= max(MIN_REPLAN_GAP, URGENT_SHARE * self._replan_seconds)
                    and self._unserved())
            ):
                self._replan_wanted = False
                self._last_replan = now
                if now >= self._replan_due:
                    self._replan_due = math.inf
                self._replan()
                self._warm_up()
                self._replan_seconds = time.monotonic() - now
            self._feed()
        except Exception:
            self._fail_safe("routing", self._all_waiting())

    def _spare_worker(self, free: list[WorkerState]) -> bool:
        """Whether one of the workers with a free slot idles without a context that
        has queued work: :func:`~dask_context.policy.plan_routes` spreads work onto
        those only, so while there is none a periodic plan could change nothing."""
        st = self.state
        for ws in free:
            w = st.workers.get(ws.address)
            if w is None or w.draining or _compat.threads_in_use(ws):
                continue
            if not any(c in st.queued and ws.address in st.contexts[c].allowed
                       for c in (*w.resident, *w.loading, *w.chosen)):
                return True
        return False

    def _unserved(self) -> bool:
        """Whether a context with queued tasks has no worker to go to."""
        return any(not self.state.contexts[c].allowed for c in self.state.queued)

    def _replan(self) -> None:
        st = self.state
        self._drop_stale_choices()
        contexts, workers = self.views()
        plan = plan_routes(contexts, workers, settle=self.settle)
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

    def _feed(self) -> None:
        """Hand queued context tasks to the workers whose slots opened and to free
        workers of the contexts that got new tasks: only those are looked at, so the
        work per event does not grow with the workers or the contexts of the cluster."""
        st = self.state
        candidates, self._dirty_workers = self._dirty_workers, set()
        contexts, self._dirty_contexts = self._dirty_contexts, set()
        for name in contexts:
            ctx = st.contexts.get(name)
            if ctx is None or not ctx.waiting:
                continue
            candidates |= ctx.allowed & self._free  # walks the smaller of the two
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
            free = ws.nthreads + extra - _compat.threads_in_use(ws)
            fits = functools.partial(_compat.has_resources, ws)
            while free > 0 and usable:
                if len(usable) == 1:
                    c = usable[0]
                else:
                    heads = [(t.priority, t.seq, c) for c in usable
                             if (t := st.head(c, fits)) is not None]
                    if not heads:
                        break
                    c = min(heads)[2]
                if (task := st.pop_head(c, fits)) is None:
                    break
                placements.append((self.scheduler.tasks[task.key], address))
                free -= 1
            (self._free.add if free > 0 else self._free.discard)(address)
        if placements:
            _compat.send(self.scheduler, placements, f"dask-context-feed-{time.time()}")
