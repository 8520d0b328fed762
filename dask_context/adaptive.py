"""Adaptive scaling that knows what a context costs to load.

Use it with any cluster that has ``adapt``, dask-jobqueue's included::

    cluster = SLURMCluster(cores=1, memory="16GB", processes=1)
    cluster.adapt(minimum_jobs=0, maximum_jobs=20, Adaptive=ContextAdaptive)

Scale-out asks the scheduler plugin how many workers the queued context work can
use (:func:`dask_context.policy.workers_wanted`): a new worker pays off only when
the backlog per worker outlasts the batch system's start-up plus a load. Scale-in
goes through ``Scheduler.workers_to_close`` as usual; the plugin's
``valid_workers_downscaling`` keeps warm workers while their context has work (and
for ``keep-warm`` seconds after), so cold workers are retired first, and keeps each
batch job's workers together. That part also works with the plain ``Adaptive``;
``ContextAdaptive`` also keeps the ``worker_key`` groups it is given together.
"""

from __future__ import annotations

import logging
import time
from inspect import isawaitable
from typing import Any

from distributed.deploy import Adaptive
from distributed.protocol import pickle

from dask_context import config
from dask_context.worker import router_present

logger = logging.getLogger(__name__)


class ContextAdaptive(Adaptive):
    """``distributed.deploy.Adaptive`` with a context-aware target.

    Parameters
    ----------
    *args, **kwargs
        As for ``Adaptive`` (``minimum``, ``maximum``, ``interval``, ``wait_count``,
        ``target_duration``...).
    startup_time
        Initial guess of the time from asking for a worker to its joining; replaced
        by what is measured. Defaults to ``dask-context.adaptive.startup-time``.
    """

    def __init__(self, *args, startup_time: float | str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.startup_time = config.get_seconds("adaptive.startup-time", startup_time)
        self._asked: tuple[float, int] | None = None
        # names of workers that drained (dask_context.preemption), while they are
        # still in the cluster's plan
        self._leaving: set[Any] = set()

    async def target(self) -> int:
        """Workers wanted, from the scheduler plugin (the default before it exists)."""
        self._measure_startup()
        if not await router_present(self.scheduler):  # not registered yet on this cluster
            return await super().target()
        drained = await self.scheduler.dask_context_drained()
        await self._forget_drained([*drained["draining"], *drained["left"]])
        return await self.scheduler.dask_context_target(
            target_duration=self.target_duration, startup=self.startup_time
        )

    async def safe_target(self) -> int:
        """The target within ``minimum`` and ``maximum``, plus the drained workers
        still in the cluster's plan: their replacements are asked for at once."""
        return await super().safe_target() + len(self._leaving)

    async def _forget_drained(self, names: list[Any]) -> None:
        """Take drained workers out of the plan once the cluster has dropped their job.

        The cluster drops a departed worker's job ``lost-worker-timeout`` after it
        left, and would then start it again, as for a lost worker. Taking it out of
        the plan earlier would not do: a new worker could get its name, and the
        cluster would close that one in its place.
        """
        self._leaving = (self._leaving | set(names)) & self.plan
        gone = [name for name in self._leaving if name not in self.requested]
        if gone:
            logger.info("Workers %s drained and left; not starting them again", gone)
            self._leaving.difference_update(gone)
            f = self.cluster.scale_down(gone)
            if isawaitable(f):
                await f

    async def workers_to_close(self, target: int) -> list[str]:
        """Workers to retire, as ``Adaptive`` chooses them, with whole ``worker_key``
        groups held back when the router keeps one of their workers warm."""
        if not await router_present(self.scheduler):
            return await super().workers_to_close(target)
        return await self.scheduler.dask_context_workers_to_close(
            target=target,
            key=pickle.dumps(self.worker_key) if self.worker_key else None,
            attribute="name",
            **self._workers_to_close_kwargs,
        )

    async def scale_up(self, n: int) -> None:
        if self._asked is None and n > len(self.observed):
            self._asked = (time.monotonic(), len(self.observed))
        await super().scale_up(n)

    def _measure_startup(self) -> None:
        """Time from a scale-up request to the first new worker joining."""
        if self._asked is None:
            return
        asked_at, before = self._asked
        if len(self.observed) > before:
            seconds = time.monotonic() - asked_at
            self.startup_time = 0.5 * self.startup_time + 0.5 * seconds
            self._asked = None
            logger.info("Worker start-up took %.1f s; now assuming %.1f s", seconds, self.startup_time)
