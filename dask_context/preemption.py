"""Drain a worker that is warned it will be killed, before the kill.

Batch systems and clouds warn before they take a machine back: SLURM sends SIGTERM
and sends SIGKILL ``KillWait`` seconds later (to job steps of a preempted job it sends
the first SIGTERM ``GraceTime`` earlier), Kubernetes waits
``terminationGracePeriodSeconds``, clouds send spot notices. :class:`PreemptionPlugin`
turns the warning into a drain of the worker:

0. the worker goes on working while no fresh worker is warm for the contexts it
   holds, for at most :data:`WORK` of the grace (``work=``): leaving at once would
   leave its share of the work idle until a replacement has started and loaded,
   while the kill is still far off;
1. the worker starts no more tasks: its status becomes ``closing_gracefully``, so
   Dask sends it nothing new, and it tells the router (``dask_context_drain``),
   which feeds it no more context tasks;
2. the tasks it was sent and has not started go back to the scheduler at once, and
   the router queues them for the workers that stay;
3. the tasks it is running may finish during the first half of the grace (the
   results it already holds are moved to peers meanwhile);
4. Dask's graceful retirement moves the results it holds to peers, and it leaves,
   with its nanny (which does not restart it), before the kill.

So a warned worker reruns at most the tasks it could not finish in time: at most its
threads. Without a warning (SIGKILL, a lost node) nothing changes: the scheduler
recomputes what the worker held, as for any lost worker.

The signal reaches both processes of a nanny-managed worker: SLURM signals every
process of a job step, Kubernetes only the container's first process (the nanny).
:class:`NannyPreemptionPlugin` keeps the nanny from killing its worker on SIGTERM
(``dask worker``'s own handler would), passes the signal on to the worker process,
and closes the nanny once the worker has left.

:func:`enable` registers both plugins; :func:`drain` (from a client) and
:func:`request_drain` (on a worker, e.g. from a thread watching a cloud's spot
notices) start the same drain without a signal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

from distributed import NannyPlugin, WorkerPlugin, get_worker
from distributed.core import Status

from dask_context import _compat, config
from dask_context.cache import plain_key
from dask_context.errors import NotRegisteredError
from dask_context.worker import router_present

if TYPE_CHECKING:
    from distributed import Client, Nanny, Worker

logger = logging.getLogger(__name__)

#: name of both plugins (worker and nanny plugins are kept apart by the scheduler);
#: not of the form of a context's plugin name (``dask-context-<context>``), so that
#: no context, whatever its name, replaces them or is replaced by them
PLUGIN_NAME = "dask-context:preemption"
#: worker handler that starts a drain (what :func:`drain` calls)
DRAIN_HANDLER = "dask_context_request_drain"
#: topic of the events a draining worker logs (``client.get_events(TOPIC)``)
TOPIC = "dask-context-preemption"
#: scheduler metadata holding the settings while draining is enabled
METADATA = ["dask-context", "preemption"]
# how often a draining worker looks at its running tasks and newly arrived ones
POLL = 0.05
# the nanny closes its worker the hard way this long after the grace, if it is still up
NANNY_FALLBACK = 1.0
#: share of the grace a warned worker goes on working while no fresh worker is warm
#: for its contexts: the drain then has the rest, half of it for the running tasks
WORK = 0.5
# how often a warned worker that goes on working asks the router who is warm
WATCH = 0.25


def _signum(sig: str | int) -> signal.Signals:
    """``"SIGTERM"``, ``"TERM"`` or ``15`` as a signal.

    >>> _signum("TERM"), _signum("SIGUSR1"), _signum(15)
    (<Signals.SIGTERM: 15>, <Signals.SIGUSR1: 10>, <Signals.SIGTERM: 15>)
    """
    if isinstance(sig, str):
        name = sig.upper()
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    return signal.Signals(sig)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------- signals
class _SignalHub:
    """One handler per signal for the whole process, calling every plugin of it.

    A ``dask worker --nworkers N`` process runs N nannies, each with its plugin;
    each plugin asks for the signals it wants and gets them on its event loop.
    Handlers can only be installed from the main thread, which is where the event
    loop of ``dask worker`` processes (nanny and worker) runs.
    """

    def __init__(self) -> None:
        self._previous: dict[signal.Signals, Any] = {}
        self._listeners: dict[signal.Signals, dict[int, tuple[asyncio.AbstractEventLoop, Callable[[int], None]]]] = {}

    def add(self, owner: object, signums: Iterable[signal.Signals], callback: Callable[[int], None]) -> bool:
        """Call ``callback(signum)`` on the running event loop on each of ``signums``.

        Returns False (and installs nothing) outside the main thread.
        """
        if not _in_main_thread():
            return False
        loop = asyncio.get_running_loop()
        for signum in signums:
            listeners = self._listeners.setdefault(signum, {})
            if not listeners:
                self._previous[signum] = signal.signal(signum, self._handle)
            listeners[id(owner)] = (loop, callback)
        return True

    def remove(self, owner: object) -> None:
        """Stop calling ``owner``; restore a signal's previous handler when nobody listens."""
        for signum in list(self._listeners):
            listeners = self._listeners[signum]
            if listeners.pop(id(owner), None) is not None and not listeners:
                del self._listeners[signum]
                signal.signal(signum, self._previous.pop(signum))

    def _handle(self, signum: int, frame: Any) -> None:
        # runs in the main thread between two bytecodes: only hand over to the event
        # loops (logging here could re-enter a handler's lock)
        for loop, callback in list(self._listeners.get(signal.Signals(signum), {}).values()):
            loop.call_soon_threadsafe(callback, signum)


_HUB = _SignalHub()


# ---------------------------------------------------------------- the worker side
class PreemptionPlugin(WorkerPlugin):
    """Drain the worker when it is warned that it will be killed.

    On one of ``signals`` (or :func:`drain`, :func:`request_drain`) the worker
    stops starting tasks, tells the router, gives back the tasks it has not
    started, lets running tasks finish during the first half of ``grace``, moves
    the results it holds to peers (``Scheduler.retire_workers``) and closes with
    its nanny, all within ``grace``. Later warnings are ignored.

    Signal handlers are installed only where the worker's event loop runs in the
    main thread (``dask worker`` processes, with or without a nanny; the process
    workers of a ``LocalCluster``); in-process workers can still be drained with
    :func:`drain`.

    Parameters
    ----------
    grace
        Time from the warning to the kill: SLURM's ``KillWait`` for a worker that
        runs in the batch script, ``GraceTime`` plus ``KillWait`` for one that runs
        in a job step (``srun``) of a preempted job. Set it a little short: work
        the kill interrupts is recomputed elsewhere, as without a warning.
    signals
        Signals that warn (names or numbers).
    work
        Share of ``grace`` the worker goes on working after the warning, until a
        worker that was not warm then is warm for every context it holds (its
        replacement, usually); 0 drains at once.
    """

    name = PLUGIN_NAME

    def __init__(self, grace: float | str | None = None, signals: Iterable[str | int] | None = None,
                 work: float = WORK):
        self.grace = config.get_seconds("preemption.grace", grace)
        self.signals = tuple(_signum(s) for s in config.get("preemption.signals", signals))
        if not 0 <= work < 1:
            raise ValueError(f"work must be a share of the grace, in [0, 1): {work!r}")
        self.work = work
        self.worker: Worker | None = None
        self._drain: asyncio.Future[dict[str, Any]] | None = None

    def setup(self, worker: Worker) -> None:
        self.worker = worker
        worker.handlers[DRAIN_HANDLER] = self._requested
        if not _HUB.add(self, self.signals, self._signalled):
            logger.debug("Worker %s runs outside the main thread: no signal handler", worker.address)

    def teardown(self, worker: Worker) -> None:
        _HUB.remove(self)
        if worker.handlers.get(DRAIN_HANDLER) == self._requested:
            del worker.handlers[DRAIN_HANDLER]

    def _signalled(self, signum: int) -> None:
        if self._drain is None and (
            self.worker.status not in (Status.running, Status.paused)
            or _compat.over_nanny_memory_limit(self.worker)
        ):
            # a worker already on its way out (closing, retiring) has nothing to drain;
            # one over the memory its nanny allows got the nanny's SIGTERM, and must
            # die so that the nanny starts a fresh one (a drain would leave for good):
            # the signal does what it would have done without this plugin
            _HUB.remove(self)
            signal.raise_signal(signum)
            return
        self.start(reason=signal.Signals(signum).name)

    def _requested(self, grace: float | str | None = None, reason: str = "requested") -> str:
        """Handler: start draining (:func:`drain`); returns at once."""
        self.start(reason, grace)
        return "draining"

    def start(self, reason: str, grace: float | str | None = None) -> asyncio.Future[dict[str, Any]]:
        """Start draining the worker, once; return the drain (a summary when done).

        Must run on the worker's event loop (:func:`request_drain` gets there from
        any thread).
        """
        if self._drain is None:
            seconds = self.grace if grace is None else config.get_seconds("preemption.grace", grace)
            self._drain = asyncio.ensure_future(self.drain(reason, seconds))
        else:
            logger.info("Worker %s is already draining; ignoring %s", self.worker.address, reason)
        return self._drain

    async def drain(self, reason: str, grace: float) -> dict[str, Any]:
        """Drain and close the worker within ``grace`` seconds; return a summary.

        The summary (also logged as the event ``drained`` under :data:`TOPIC`)
        holds the seconds it went on working (``worked``), the tasks given back, the
        running tasks left unfinished (``abandoned``: they rerun elsewhere) and
        whether the results were moved to peers (``retired``). The worker closes even
        when draining fails.
        """
        worker = self.worker
        if worker.status not in (Status.running, Status.paused):
            logger.info("Worker %s is %s: nothing to drain (%s)", worker.address, worker.status.name, reason)
            return {"reason": reason, "retired": False}
        began, signalled = time.monotonic(), time.time()
        logger.warning("Worker %s drains (%s): %.1f s until it must be gone", worker.address, reason, grace)
        try:
            # the working phase bounds its own wait; this bounds the router's answers too
            await asyncio.wait_for(self._work_on(grace * self.work), grace * self.work + WATCH)
        except asyncio.TimeoutError:
            pass
        except Exception:
            # going on working is a gain, never a condition of the drain
            logger.warning("Worker %s could not watch for its replacement; it drains now",
                           worker.address, exc_info=True)
        worked = time.monotonic() - began
        left = grace - worked
        try:
            # the steps bound their own waits; this bounds the scheduler's answers too
            summary = await asyncio.wait_for(self._move_out(reason, left, signalled, worked), left)
        except asyncio.TimeoutError:
            logger.warning("Worker %s did not drain within %.1f s; it closes", worker.address, grace)
            summary = {"reason": reason, "retired": False}
        except Exception:
            logger.exception("Worker %s could not drain; it closes, and what it holds is recomputed", worker.address)
            summary = {"reason": reason, "retired": False}
        # the executor's threads may still run abandoned tasks: do not wait for them
        await worker.close(nanny=True, executor_wait=False, reason=f"dask-context-drain-{reason}")
        return summary

    async def _work_on(self, limit: float) -> None:
        """Return once a worker that was not warm now is warm for every context this
        one holds, or after ``limit`` seconds: until then this worker works as usual.

        Returns at once where there is nothing to wait for: no time, no router, no
        context held here.
        """
        worker = self.worker
        if limit <= 0 or not await router_present(worker.scheduler):
            return
        deadline = time.monotonic() + limit
        report = await worker.scheduler.dask_context_report()
        held = (report["workers"].get(worker.address) or {}).get("resident") or {}
        # the workers warm for each context at the warning: a newcomer among them
        # takes this worker's place
        before = {c: {*report["contexts"][c]["warm"], worker.address} for c in held if c in report["contexts"]}
        if not before:
            return
        logger.info("Worker %s goes on working for at most %.1f s, until a fresh worker is warm for %s",
                    worker.address, limit, sorted(before))
        while time.monotonic() + WATCH < deadline and worker.status in (Status.running, Status.paused):
            await asyncio.sleep(WATCH)
            report = await worker.scheduler.dask_context_report()
            leaving = {a for a, w in report["workers"].items() if w.get("draining")}
            if all(set(report["contexts"].get(c, {}).get("warm", ())) - warm - leaving for c, warm in before.items()):
                logger.info("Worker %s: a fresh worker is warm for its contexts; it drains", worker.address)
                return

    async def _move_out(self, reason: str, grace: float, signalled: float, worked: float) -> dict[str, Any]:
        """Everything but closing: stop, give back, let tasks finish, move results.

        ``grace``: seconds left until the kill; ``worked``: seconds the worker went
        on working since the warning at ``signalled``.
        """
        worker = self.worker
        began = time.monotonic()
        deadline = began + grace
        _compat.stop_starting_tasks(worker)
        held = await self._tell_router()
        given_back = self._give_back()
        worker.log_event(
            TOPIC,
            {
                "action": "draining", "reason": reason, "signalled": signalled, "grace": grace + worked,
                "worked": worked,
                "held": len(held), "given_back": [plain_key(k) for k in given_back],
                "running": [plain_key(k) for k in _compat.running_keys(worker)],
            },
        )
        finish_by = began + grace / 2
        if _compat.running_keys(worker) and time.monotonic() < finish_by:
            # move what is done now, so that it is safe whatever the running tasks do
            await self._retire(remove=False, deadline=finish_by)
            while _compat.running_keys(worker) and time.monotonic() < finish_by:
                await asyncio.sleep(POLL)
                # a task sent just before the router heard of the drain arrives late
                given_back += self._give_back()
        abandoned = [plain_key(k) for k in _compat.running_keys(worker)]
        given_back += self._give_back()
        retired = await self._retire(remove=True, deadline=deadline)
        summary = {
            "action": "drained", "reason": reason, "signalled": signalled, "worked": worked,
            "seconds": time.monotonic() - began + worked, "retired": retired,
            "given_back": [plain_key(k) for k in given_back], "abandoned": abandoned,
        }
        worker.log_event(TOPIC, summary)
        logger.warning(
            "Worker %s drained in %.2f s (%s): %d task(s) given back, %d left unfinished, "
            "results %s", worker.address, summary["seconds"], reason, len(given_back),
            len(abandoned), "moved to peers" if retired else "NOT moved (no peer, or no time)",
        )
        return summary

    async def _tell_router(self) -> list[Hashable]:
        """Ask the router to feed this worker nothing more; the context tasks it holds."""
        worker = self.worker
        if not await router_present(worker.scheduler):
            return []
        return await worker.scheduler.dask_context_drain(worker=worker.address)

    def _give_back(self) -> list[Hashable]:
        keys = _compat.not_started_keys(self.worker)
        if keys:
            _compat.give_back(self.worker, keys, f"dask-context-drain-{time.time()}")
        return keys

    async def _retire(self, remove: bool, deadline: float) -> bool:
        """Move the worker's unique results to peers (and, with ``remove``, leave).

        Returns whether the scheduler retired the worker. It does not when no
        other worker can take the results, or when the deadline comes first.
        """
        worker = self.worker
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return False
        try:
            retired = await asyncio.wait_for(
                worker.scheduler.retire_workers(
                    workers=[worker.address], close_workers=False, remove=remove,
                    stimulus_id=f"dask-context-drain-{time.time()}",
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            logger.warning("Worker %s: moving its results took longer than the grace left", worker.address)
            return False
        # an aborted retirement gives the worker its previous status back
        _compat.stop_starting_tasks(worker)
        return worker.address in retired


class NannyPreemptionPlugin(NannyPlugin):
    """Keep a nanny from killing its worker on the warning; pass the warning on.

    ``dask worker``'s own SIGTERM handler closes the nanny, which kills the worker
    process at once. This plugin takes the signal instead: the nanny will not
    restart its worker, forwards the signal to it (whose
    :class:`PreemptionPlugin` drains it and closes it with the nanny), and closes
    it the hard way if it is still up ``grace`` (plus a second) later.

    Parameters
    ----------
    grace, signals
        As for :class:`PreemptionPlugin`.
    """

    name = PLUGIN_NAME

    def __init__(self, grace: float | str | None = None, signals: Iterable[str | int] | None = None):
        self.grace = config.get_seconds("preemption.grace", grace)
        self.signals = tuple(_signum(s) for s in config.get("preemption.signals", signals))
        self.nanny: Nanny | None = None
        self._fallback: asyncio.TimerHandle | None = None
        self._closing: asyncio.Future[Any] | None = None

    def setup(self, nanny: Nanny) -> None:
        self.nanny = nanny
        if not _compat.in_dask_worker_cli():
            # a nanny inside a user's program (a LocalCluster's): the program's
            # signals are its own; the worker processes still drain on theirs
            return
        if not _HUB.add(self, self.signals, self._signalled):
            logger.debug("Nanny %s runs outside the main thread: no signal handler", nanny.address)

    def teardown(self, nanny: Nanny) -> None:
        _HUB.remove(self)
        if self._fallback is not None:
            self._fallback.cancel()

    def _signalled(self, signum: int) -> None:
        nanny = self.nanny
        if self._fallback is not None or nanny.status in (Status.closing, Status.closed):
            return
        pid = nanny.pid
        if not pid:
            # no worker process to drain: the signal does what it would have done
            _HUB.remove(self)
            signal.raise_signal(signum)
            return
        name = signal.Signals(signum).name
        logger.info("Nanny %s got %s: its worker drains", nanny.address, name)
        # no restart when the worker exits; the nanny closes with it
        nanny.close_gracefully(reason=f"dask-context-drain-{name}")
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # the worker process is already gone; the nanny closes
        self._fallback = asyncio.get_running_loop().call_later(self.grace + NANNY_FALLBACK, self._close)

    def _close(self) -> None:
        nanny = self.nanny
        if nanny.status not in (Status.closing, Status.closed):
            logger.warning("Nanny %s: its worker did not drain in time; closing it", nanny.address)
            self._closing = asyncio.ensure_future(nanny.close(reason="dask-context-drain-timeout"))


# ---------------------------------------------------------------- user API
def enable(client: Client, grace: float | str | None = None, signals: Iterable[str | int] | None = None) -> Any:
    """Drain workers (and their nannies) of this cluster on ``signals``, now and later.

    :func:`dask_context.register` does this (with the ``dask-context.preemption``
    settings) unless ``dask-context.preemption.enabled`` is false or it was enabled
    already. Enabling again replaces the settings. The scheduler's metadata
    :data:`METADATA` holds them (``client.get_metadata(METADATA)``).

    Parameters
    ----------
    client
        A client of the cluster (an asynchronous one returns an awaitable).
    grace, signals
        As for :class:`PreemptionPlugin` (default: the ``dask-context.preemption``
        settings).
    """
    grace = config.get_seconds("preemption.grace", grace)
    return client.sync(enable_async, client, grace, tuple(config.get("preemption.signals", signals)))


async def enable_async(client: Client, grace: float, signals: tuple[str | int, ...]) -> None:
    """:func:`enable` from a coroutine (``grace`` in seconds)."""
    await client.register_plugin(PreemptionPlugin(grace, signals))
    await client.register_plugin(NannyPreemptionPlugin(grace, signals))
    await client.scheduler.set_metadata(
        keys=METADATA, value={"grace": grace, "signals": [_signum(s).name for s in signals]}
    )


def disable(client: Client) -> Any:
    """Stop draining on signals (undo :func:`enable`); a no-op when it is not enabled.

    Workers then die on SIGTERM as Dask's own do, and what they held is recomputed.
    """
    return client.sync(_disable, client)


async def _disable(client: Client) -> None:
    # unregistering a plugin that is not there would log an error on the scheduler
    if not await client.scheduler.get_metadata(keys=METADATA, default=None):
        return
    await client.unregister_worker_plugin(PLUGIN_NAME)
    await client.unregister_worker_plugin(PLUGIN_NAME, nanny=True)
    await client.scheduler.set_metadata(keys=METADATA, value=None)


def drain(client: Client, workers: Iterable[str], grace: float | str | None = None, reason: str = "requested") -> Any:
    """Drain ``workers`` as if they had been warned (e.g. on a cloud's spot notice).

    Returns once each worker has started draining; they leave within ``grace``
    (by default the one given to :func:`enable`).

    Parameters
    ----------
    client
        A client of the cluster.
    workers
        Worker addresses.
    grace
        Time each worker has before it is killed.
    reason
        Logged by the workers and in their events.

    Returns
    -------
    The addresses of the workers that started draining.

    Examples
    --------
    .. code-block:: python

        dask_context.preemption.drain(client, ["tcp://10.0.0.7:40123"], grace="110s")
    """
    return client.sync(_drain, client, list(workers), grace, reason)


async def _drain(client: Client, workers: list[str], grace: float | str | None, reason: str) -> list[str]:
    replies = await client.scheduler.broadcast(
        msg={"op": DRAIN_HANDLER, "grace": grace, "reason": reason}, workers=workers
    )
    return sorted(replies)


def request_drain(grace: float | str | None = None, reason: str = "requested", worker: Worker | None = None) -> None:
    """Start draining this worker; callable from a task or from any thread of it.

    Parameters
    ----------
    grace
        Time the worker has before it is killed (default: the plugin's).
    reason
        Logged by the worker and in its events.
    worker
        The worker; by default the one running the current task.

    Raises
    ------
    NotRegisteredError
        If :func:`enable` was not called for the worker's cluster.
    """
    worker = worker or get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, PreemptionPlugin):
        raise NotRegisteredError(
            f"preemption handling is not set up on worker {worker.address}: call "
            "dask_context.preemption.enable(client) first"
        )
    worker.loop.add_callback(plugin.start, reason, grace)
