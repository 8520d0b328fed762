"""How the router's observers see it, and what the router calls on them.

The dashboard page (:mod:`dask_context.dashboard`), the metrics collector
(:mod:`dask_context.metrics`) and the scale-in filter
(:class:`dask_context.adaptive.Scaling`) read the router through
:class:`RouterView` alone: none of them imports the router, and the router does
not import them. :func:`dask_context._setup.install` creates them for a router and
hands it an :class:`Observers`, the three calls the router makes on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.scheduler import WorkerState

    from dask_context.policy import ContextView, WorkerView
    from dask_context.state import RouterState


class RouterView(Protocol):
    """What an observer may use of a running router.

    ``scheduler`` and ``state`` are to be read, not changed, except by the
    scale-in filter's drain, which marks a worker as draining and then calls
    ``wake(replan=True)`` so that the router stops sending it tasks.
    """

    #: the scheduler the router runs on
    scheduler: Scheduler
    #: workers, contexts and routed tasks (:class:`~dask_context.state.RouterState`)
    state: RouterState

    def report(self) -> dict[str, Any]:
        """Plain-data summary of every context and worker."""

    def views(self, routing: bool = True) -> tuple[dict[str, ContextView], dict[str, WorkerView]]:
        """The policies' views of contexts and workers (``routing=False``: for scaling)."""

    def wake(self, replan: bool = False, worker: str | None = None, context: str | None = None) -> None:
        """Route again once the current handler ends."""


class ScaleIn(Protocol):
    """What the router calls on the scale-in filter."""

    def valid_workers_downscaling(self, workers: list[WorkerState]) -> list[WorkerState]:
        """The workers of ``workers`` that may close."""

    def worker_left(self, address: str) -> None:
        """A worker left the cluster."""


@dataclass
class Observers:
    """The calls the router makes on its observers."""

    #: the scale-in filter (``router.scaling``)
    scaling: ScaleIn
    #: add the Contexts page to the scheduler's dashboard (may raise: the router
    #: logs it and routes on)
    show_page: Callable[[], None]
    #: the router closes: stop observing it
    close: Callable[[], None]
