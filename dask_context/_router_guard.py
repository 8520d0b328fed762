"""The router's guarantees: no task stranded, no context stalled.

``_fail_hopeless`` fails the queued tasks of a context whose load failed
everywhere; ``_guard`` acts on a context whose tasks wait while a worker could
serve them (a survey with plugin repair, then handing them back to Dask);
``_reconcile`` re-queues or gives back parked tasks the router lost track of. The
fail-safe (``_fail_safe``, ``_release``) hands tasks back to Dask's own scheduling
when anything inside the router raises.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from dask_context import _compat, config
from dask_context._router_base import RouterBase, logger
from dask_context.policy import load_failed_everywhere
from dask_context.state import ContextRecord

if TYPE_CHECKING:
    from distributed.scheduler import TaskState


class GuardMixin(RouterBase):
    """Stall guard, reconcile and fail-safe.

    Owns its settings: ``death_limit`` (workers that may die loading a context since
    it last loaded before its tasks fail), ``failed_limit`` (workers a load may fail
    on before its tasks fail) and ``stall_margin`` (how long past a load a context
    may wait with an idle worker able to serve it; also the grace before a plugin
    is reinstalled).
    The per-context stall counters live in the context records (``ctx.stalls``,
    ``ctx.progress``).
    """

    def _init_guard(self) -> None:
        self.failed_limit = int(config.get("scheduler.failed-load-workers"))
        self.death_limit = int(config.get("scheduler.load-deaths"))
        self.stall_margin = config.get_seconds("scheduler.stall-margin")
        # seen among the scheduler's plugins: once removed, it hands everything back
        self._installed = False

    def _still_installed(self) -> bool:
        """Whether this router is still one of the scheduler's plugins.

        ``unregister_scheduler_plugin`` (or another plugin registered under its
        name) removes it without closing it: its hooks stop, and the tasks it
        parked, or sent to a worker with a restriction to that worker, would wait
        forever. Removed, it gives every one of them back to Dask's own scheduling
        and closes.
        """
        if any(p is self for p in self.scheduler.plugins.values()):
            self._installed = True
            return True
        if not self._installed and not self.state.tasks:
            # starting (register_scheduler_plugin adds it after start), or removed
            # before its first tick without routing anything: nothing to give back
            return True
        tasks = [ts for key in self.state.tasks if (ts := self.scheduler.tasks.get(key)) is not None]
        parked = [ts for ts in tasks if _compat.is_parked(ts)]
        for ts in tasks:
            _compat.unpark(ts)
        logger.warning(
            "The router was removed from the scheduler: the %d task(s) it routed (%d "
            "waiting) go back to Dask's own scheduling", len(tasks), len(parked),
        )
        self.state.tasks.clear()
        self._later(_compat.reschedule, parked)
        self.scheduler.loop.add_callback(self.close)
        return False

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
                self._fail_queued(ctx, len(ctx.failed_on))

    def _fail_queued(self, ctx: ContextRecord, workers: int) -> None:
        """Fail the queued tasks of ``ctx`` with ``ctx.error``: its load failed on
        ``workers`` workers."""
        keys = [t.key for t in self.state.waiting_tasks(ctx)]
        logger.error("Context %r failed to load on %d worker(s) (%s): failing %d queued task(s)",
                     ctx.name, workers, ctx.error["exception_text"], len(keys))
        _compat.fail(self.scheduler, keys, ctx.error, f"dask-context-failed-{time.time()}")

    def _guard(self, now: float) -> None:
        """Act on a context whose queued tasks wait while a worker could serve them.

        A context stalls when none of its tasks was sent to a worker for longer than
        a load plus ``scheduler.stall-margin`` (or since a worker last joined)
        while a running worker that may load it, and has the resources some of
        its queued tasks ask for, sits idle. The first time, the router's records
        of the workers are read again from the workers, missing plugins are
        installed again and routing is re-planned; if it stalls again, its queued
        tasks go back to Dask's own scheduling (they load the context where they
        land). Both are logged at ERROR: a stall is a bug of the router, never a
        state to wait in.
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
        """Running workers with a free thread that may load ``ctx`` and have the
        resources some of its queued tasks ask for."""
        fitting = self._resource_fits(ctx)
        fit = None if not fitting or None in fitting else frozenset().union(*fitting)
        return [
            ws.address for ws in _compat.running_workers(self.scheduler)
            if _compat.threads_in_use(ws) < ws.nthreads
            and (fit is None or ws.address in fit)
            and (w := self.state.workers.get(ws.address)) is not None
            and not w.draining and ctx.name not in w.failed
        ]

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
