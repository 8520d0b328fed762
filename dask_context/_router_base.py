"""What the router's units share: its log name, the attributes every unit reads,
and the background tasks it starts.

The router (:class:`dask_context.scheduler.ContextRouter`) is one
``SchedulerPlugin`` made of units, each a mixin in its own module that owns a part
of the state and documents it:

==============================  ==================================================
:mod:`._router_intake`          the Dask hooks that feed the state
:mod:`._router_learning`        routing unmarked tasks: marks, learned groups
:mod:`._router_loop`            the routing loop: re-plans, warm-ups, evictions, feeding
:mod:`._router_views`           the plain-data views the policies decide on
:mod:`._router_guard`           the stall guard, reconcile and the fail-safe
:mod:`._router_handlers`        the worker- and client-facing scheduler handlers
:mod:`._router_report`          the report
==============================  ==================================================

Its observers (dashboard page, metrics, scale-in filter) see it only through
:class:`dask_context._observers.RouterView`; :func:`dask_context._setup.install`
composes them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Scheduler

    from dask_context.state import RouterState

# one log name for the whole router, as before it was split into modules: users
# (and tests) filter the router's messages on it
logger = logging.getLogger("dask_context.scheduler")


class RouterBase:
    """The attributes every unit of the router reads.

    Owns ``scheduler`` (the scheduler it runs on, None until started), ``state``
    (the :class:`~dask_context.state.RouterState` of workers, contexts and routed
    tasks, set on start) and ``_background`` (asyncio tasks it started; cancelled on
    close).
    """

    scheduler: Scheduler | None
    state: RouterState
    _background: set[asyncio.Task]

    def _init_base(self) -> None:
        self._background = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
