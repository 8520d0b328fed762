"""Composes a router with its observers.

:func:`install` is called once by :meth:`ContextRouter.start
<dask_context.scheduler.ContextRouter.start>`: it creates the scale-in filter
(:class:`~dask_context.adaptive.Scaling`) and adds its scheduler handlers, registers
the metrics collector (:mod:`dask_context.metrics`), and gives the router the way
to show the dashboard's Contexts page (:mod:`dask_context.dashboard`). The
observers read the router through :class:`~dask_context._observers.RouterView`
only; this is the one module that knows both sides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dask_context import dashboard
from dask_context._observers import Observers, RouterView
from dask_context.adaptive import Scaling
from dask_context.metrics import register_collector, unregister_collector

if TYPE_CHECKING:
    from distributed import Scheduler


def install(scheduler: Scheduler, router: RouterView) -> Observers:
    """Create the observers of ``router`` on ``scheduler``; returns what it calls on them."""
    scaling = Scaling(router)
    scheduler.handlers.update(
        {
            "dask_context_target": scaling.target,
            "dask_context_workers_to_close": scaling.workers_to_close,
            "dask_context_drain": scaling.drain,
            "dask_context_drained": scaling.drained,
        }
    )
    collector = register_collector(router)
    return Observers(
        scaling=scaling,
        show_page=lambda: dashboard.install(scheduler),
        close=lambda: unregister_collector(collector),
    )
