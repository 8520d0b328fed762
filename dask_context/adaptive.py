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
from collections.abc import Callable, Hashable
from inspect import isawaitable
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_timedelta
from distributed.deploy import Adaptive
from distributed.protocol import pickle

from dask_context import _compat, config
from dask_context.policy import RetireView, hold_back, workers_wanted
from dask_context.worker import router_present

if TYPE_CHECKING:
    from distributed.scheduler import WorkerState

    from dask_context._observers import RouterView

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


class Scaling:
    """The router's side of adaptive scaling, on the scheduler.

    It answers ``ContextAdaptive`` (the scheduler handlers ``dask_context_target``,
    ``dask_context_workers_to_close`` and ``dask_context_drained``), filters every
    scale-in (``valid_workers_downscaling``), and keeps track of workers that drain
    before a preemption (``dask_context_drain``).

    Parameters
    ----------
    router
        The :class:`~dask_context.scheduler.ContextRouter` it works for.
    """

    def __init__(self, router: RouterView):
        self.router = router
        self.keep_warm = config.get_seconds("adaptive.keep-warm")
        self.startup_time = config.get_seconds("adaptive.startup-time")
        # the key= grouping of the workers_to_close call under way, if any
        self._grouping: Callable[[WorkerState], Hashable] | None = None
        # draining workers (address -> name), and the names of those that drained and
        # left since ContextAdaptive last asked (dask_context.preemption)
        self._draining: dict[str, Any] = {}
        self._drained_left: list[Any] = []

    # ------------------------------------------------------------ scale-in
    def valid_workers_downscaling(self, workers: list[WorkerState]) -> list[WorkerState]:
        """Keep warm workers worth keeping out of scale-in, with their whole group.

        Any scale-in that goes through ``Scheduler.workers_to_close`` (``Adaptive``,
        dask-jobqueue's ``adapt``, ``retire_workers(n=...)``) asks this. It holds
        back only workers warm for a context that has work, or warm and used less
        than ``dask-context.adaptive.keep-warm`` ago, and with each of them every
        worker of its group (its batch job, or the ``key=`` groups of
        :class:`ContextAdaptive`), and draining workers (they leave by themselves).
        Busy and cold workers are left to Dask's own rules.
        """
        try:
            return self._downscaling(workers)
        except Exception:
            logger.error("dask-context scale-in filter failed; Dask decides alone", exc_info=True)
            return workers

    def _downscaling(self, workers: list[WorkerState]) -> list[WorkerState]:
        st = self.router.state
        # a draining worker leaves by itself, within its grace; closing it (scancel)
        # would cut the grace short
        workers = [ws for ws in workers if ws.address not in self._draining]
        if not any(w.resident for w in st.workers.values()):
            return workers
        now = time.monotonic()
        views = {}
        for address, ws in self.router.scheduler.workers.items():
            w = st.workers.get(address)
            if w is None:
                continue
            group = self._grouping(ws) if self._grouping is not None else w.job
            idle_for = 0.0 if w.tasks else max(0.0, now - w.idle_since)
            views[address] = RetireView(warm=frozenset(w.resident), idle_for=idle_for, group=group)
        wanted = {c for c, ctx in st.contexts.items() if ctx.waiting} | {
            c for w in st.workers.values() for c in w.tasks
        }
        held = hold_back(views, wanted, self.keep_warm)
        return [ws for ws in workers if ws.address not in held]

    def workers_to_close(self, key: bytes | None = None, **kwargs: Any) -> list[str]:
        """Scheduler handler: ``Scheduler.workers_to_close`` with groups known here.

        :class:`ContextAdaptive` calls this instead of the scheduler's own handler
        so that the scale-in filter holds back whole ``key=`` groups.
        """
        self._grouping = pickle.loads(key) if key else None
        try:
            return self.router.scheduler.workers_to_close(key=self._grouping, **kwargs)
        finally:
            self._grouping = None

    # ------------------------------------------------------------ scale-out
    def target(self, target_duration: float | str | None = None, startup: float | None = None) -> int:
        """Scheduler handler: workers wanted, counting load (and start-up) time.

        Context work asks for :func:`dask_context.policy.workers_wanted`; other work
        for what the scheduler's own ``adaptive_target`` says.
        """
        s = self.router.scheduler
        if target_duration is None:
            target_duration = dask.config.get("distributed.adaptive.target-duration")
        target_duration = parse_timedelta(target_duration)
        contexts, _ = self.router.views(routing=False)
        startup = self.startup_time if startup is None else startup
        wanted = workers_wanted(contexts, startup, target_duration)
        ours = sum(v.queued for v in contexts.values()) + sum(
            w.inflight() for w in self.router.state.workers.values()
        )
        if _compat.non_context_ready(s, ours) > 0:
            wanted = max(wanted, s.adaptive_target(target_duration))
        # draining workers do not count: they leave by themselves, and
        # ContextAdaptive adds them on top so that their replacements come now
        staying = [a for a in s.workers if a not in self._draining]
        if wanted < len(staying):
            # like the scheduler's own target: keep workers holding results that
            # clients still want (and, through the downscaling filter, warm ones)
            closable = set(s.workers_to_close())
            wanted = max(wanted, sum(a not in closable for a in staying))
        return wanted

    # ------------------------------------------------------------ preemption
    def drain(self, worker: str) -> list[Hashable]:
        """Scheduler handler: ``worker`` will be preempted; it takes no new context tasks.

        Returns the keys of the context tasks it has been sent and not finished.
        """
        router = self.router
        w = router.state.workers.get(worker)
        if w is None:
            return []
        w.draining = True
        ws = router.scheduler.workers.get(worker)
        if ws is not None:
            self._draining[worker] = ws.name
        for ctx in router.state.contexts.values():
            ctx.allowed.discard(worker)
        router.wake(replan=True)
        return [k for keys in w.tasks.values() for k in keys]

    def drained(self) -> dict[str, list[Any]]:
        """Scheduler handler: names of the workers draining (``draining``), and of
        those that drained and left since the last call (``left``).

        :class:`ContextAdaptive` asks for their replacements at once, and takes those
        that left out of the cluster's plan.
        """
        left, self._drained_left = self._drained_left, []
        return {"draining": list(self._draining.values()), "left": left}

    def worker_left(self, address: str) -> None:
        if address in self._draining:
            self._drained_left.append(self._draining.pop(address))
