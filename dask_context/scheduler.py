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

The plugin is composed of units, each in its own module and owning its part of
the state (see :mod:`dask_context._router_base` for the map): the Dask hooks
(:mod:`._router_intake`), which tasks are routed (:mod:`._router_learning`), the
routing loop (:mod:`._router_loop`) and the views it hands the policies
(:mod:`._router_views`), the guarantees (:mod:`._router_guard`), the scheduler
handlers (:mod:`._router_handlers`) and the report (:mod:`._router_report`). This
module holds the plugin's lifecycle. Its observers (dashboard page, metrics,
scale-in filter) are composed by :func:`dask_context._setup.install`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from distributed import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from dask_context import _compat, _setup, config
from dask_context._protocol import ROUTER_METADATA, ROUTER_NAME, WARNINGS
from dask_context._router_base import logger
from dask_context._router_guard import GuardMixin
from dask_context._router_handlers import HandlersMixin
from dask_context._router_intake import IntakeMixin
from dask_context._router_learning import LearningMixin
from dask_context._router_loop import RoutingMixin
from dask_context._router_report import ReportMixin
from dask_context._router_views import ViewsMixin
from dask_context.spec import ContextSpec, from_config
from dask_context.state import RouterState

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import WorkerState

# WARNINGS: the topic of the router's warnings for users, importable from here as before
__all__ = ["WARNINGS", "ContextRouter", "declared_specs"]


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


class ContextRouter(
    IntakeMixin,
    LearningMixin,
    RoutingMixin,
    ViewsMixin,
    GuardMixin,
    HandlersMixin,
    ReportMixin,
    SchedulerPlugin,
):
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

    name = ROUTER_NAME
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
        self._init_base()
        self._init_intake()
        self._init_learning()
        self._init_loop()
        self._init_views()
        self._init_guard()
        self._init_handlers()
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
                "dask_context_settings": self.worker_settings,
                "dask_context_worker": self.worker_joined,
                "dask_context_file_peers": self.file_peers,
                "dask_context_file_source": self.file_source,
            }
        )
        self._pc = PeriodicCallback(self._periodic, self.interval * 1000)
        scheduler.periodic_callbacks["dask-context"] = self._pc
        self._pc.start()
        # the scale-in filter (with its handlers), the metrics collector and the
        # dashboard page: they read this router through dask_context._observers
        self.observers = _setup.install(scheduler, self)
        self.scaling = self.observers.scaling
        if any(name.startswith("dask-context-") for name in scheduler.worker_plugins):
            # context plugins were set up before this router: ask what workers hold
            await self._survey()

    async def close(self) -> None:
        if self.scheduler is None:
            return
        # a router that replaced this one keeps its own callback and workers' trust
        if not any(isinstance(p, ContextRouter) for p in self.scheduler.plugins.values() if p is not self):
            self.scheduler.set_metadata(ROUTER_METADATA, False)
        if self.scheduler.periodic_callbacks.get("dask-context") is self._pc:
            del self.scheduler.periodic_callbacks["dask-context"]
        self._pc.stop()
        for task in self._background:
            task.cancel()
        self.observers.close()

    def restart(self, scheduler: Scheduler) -> None:
        # Scheduler.restart clears task metadata, where workers look for the router
        # before they announce their contexts
        scheduler.set_metadata(ROUTER_METADATA, True)

    # ------------------------------------------------------------ adaptive
    def valid_workers_downscaling(self, scheduler: Scheduler, workers: list[WorkerState]) -> list[WorkerState]:
        """Keep warm workers worth keeping out of scale-in (see :class:`~dask_context.adaptive.Scaling`)."""
        return self.scaling.valid_workers_downscaling(workers)
