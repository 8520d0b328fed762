"""What the policies see: plain-data views of the router's state.

:meth:`ViewsMixin.views` builds the :class:`~dask_context.policy.ContextView` and
:class:`~dask_context.policy.WorkerView` records that
:func:`~dask_context.policy.plan_routes` (routing) and
:func:`~dask_context.policy.workers_wanted` (scaling) decide on, with the
estimates behind them: task durations (``_duration``), load times
(``_load_time``) and whether a worker may load a context (``_can_load``).
"""

from __future__ import annotations

import math
import time

import dask.config
from dask.utils import parse_timedelta

from dask_context import _compat, config
from dask_context._router_base import RouterBase
from dask_context.policy import (
    ContextView,
    Resident,
    WorkerView,
    fit_resources,
    load_failed_everywhere,
)
from dask_context.state import ContextRecord, WorkerRecord, underestimate


class ViewsMixin(RouterBase):
    """The policies' views and the estimates behind them.

    Owns the estimates' defaults: ``default_load_time`` (a context never loaded,
    without a hint) and ``unknown_duration`` (a task before any was measured). The
    measured durations are :mod:`._router_intake`'s.
    """

    def _init_views(self) -> None:
        self.default_load_time = config.get_seconds("scheduler.default-load-time")
        self.unknown_duration = parse_timedelta(
            dask.config.get("distributed.scheduler.unknown-task-duration")
        )

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
        scale = underestimate((ctx.memory, ctx.nbytes) for ctx in st.contexts.values())
        for c, ctx in st.contexts.items():
            head = st.head(ctx)
            held = any(c in st.workers[a].resident for a in ctx.allowed if a in st.workers)
            # failed on failed-load-workers workers (or all) and held nowhere: only the
            # loads in flight may still succeed and no other starts, so that its tasks
            # fail when those end, however many workers (restarted or new) could try
            given_up = not held and load_failed_everywhere(
                ctx.failed_on, running, serving=False, limit=self.failed_limit)
            # a measured load against a guessed duration would warm workers on no
            # evidence (a warm worker is measuring its tasks' duration now); guesses
            # on both sides (before the first load) are comparable
            measuring = routing and ctx.load_time is not None
            allowed, unfit = frozenset(ctx.allowed), frozenset()
            fitting = self._resource_fits(ctx)
            if fitting:
                allowed, unfit = fit_resources(fitting, allowed, frozenset(running))
            contexts[c] = ContextView(
                queued=ctx.waiting,
                backlog=sum(n * self._duration(p, measuring) for p, n in ctx.by_prefix.items()),
                load_time=self._load_time(ctx),
                nbytes=ctx.size(scale),
                allowed=allowed,
                first=head.priority if head is not None else (),
                # the workers _can_load refuses, from indexes kept as they change
                excluded=unfit.union(ctx.lacking, ctx.failed_on, draining,
                                     running.keys() - ctx.allowed if given_up else ()),
                waited=now - ctx.since if ctx.since is not None else 0.0,
                measured=ctx.nbytes is not None,
                failing=bool(ctx.failed_on) and not held,
            )
        workers = {}
        for a, w in records.items():
            held = {c: Resident(n, w.last_used.get(c, 0.0)) for c, n in w.resident.items()}
            unmeasured = set()
            for c in (*w.loading, *w.chosen):
                size = st.contexts[c].size(scale) if c in st.contexts else None
                if c in st.contexts and st.contexts[c].nbytes is None:
                    unmeasured.add(c)
                held.setdefault(c, Resident(size or 0, math.inf))
            workers[a] = WorkerView(
                budget=math.inf if w.budget is None else w.budget,
                resident=held,
                inflight=_compat.threads_in_use(running[a]),
                busy=frozenset(w.tasks),
                unmeasured=frozenset(unmeasured),
            )
        return contexts, workers

    def _resource_fits(self, ctx: ContextRecord) -> list[frozenset[str] | None]:
        """For each ``resources=`` request among ``ctx``'s queued tasks, the running
        workers that have those resources (None: tasks that ask for none); empty
        when no queued task asks for any, the common case, in constant time."""
        if not ctx.by_resources.keys() - {()}:
            return []
        running = {ws.address for ws in _compat.running_workers(self.scheduler)}
        return [frozenset(_compat.workers_with(self.scheduler, r) & running) if r else None
                for r in ctx.by_resources]

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
