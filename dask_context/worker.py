"""The worker side: one WorkerPlugin per context, one :class:`WorkerContexts` per worker.

:class:`ContextPlugin` makes a context loadable on every worker, now and in the
future. All contexts of a worker share one :class:`WorkerContexts`, which holds the
worker's :class:`~dask_context.cache.ContextCache`, reports to the scheduler plugin
(the router) and answers its requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes
from distributed import Reschedule, WorkerPlugin, get_worker
from distributed.core import Status
from distributed.utils import key_split_group

from dask_context import _compat, config, devices
from dask_context._protocol import ROUTER_METADATA, TOPIC, UNROUTED, plugin_name
from dask_context.cache import ContextCache, plain_key
from dask_context.errors import NotRegisteredError, UnknownContextError, error_payload
from dask_context.spec import ContextSpec
from dask_context.staging import Stager

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

EXTENSION = "dask-context"


class ContextPlugin(WorkerPlugin):
    """Make one context available on every worker, now and in the future.

    Registering it (``client.register_plugin(ContextPlugin(spec))``, or
    :func:`dask_context.register`, which also registers the scheduler plugin) runs
    :meth:`setup` on every worker, including workers that join later. Setup only
    records the spec, unless the spec is ``eager``: the load itself happens on first
    use, in the thread of the task that asks for it. Setup also tells the scheduler
    plugin (:class:`~dask_context.scheduler.ContextRouter`) that this worker can
    serve the context, so routing works without :func:`dask_context.register` too.

    Parameters
    ----------
    spec
        The context to provide.
    idempotent
        Leave a plugin already registered under this context's name in place (the
        identical spec is registered: its warm copies stay).
    """

    def __init__(self, spec: ContextSpec, idempotent: bool = False):
        if not isinstance(spec, ContextSpec):
            raise TypeError(f"ContextPlugin takes a ContextSpec, got {spec!r}")
        self.spec = spec
        self.name = plugin_name(spec.name)
        self.idempotent = idempotent

    async def setup(self, worker: Worker) -> None:
        contexts = await worker_contexts(worker)
        await contexts.add(self.spec)

    async def teardown(self, worker: Worker) -> None:
        if worker.status in (Status.closing, Status.closed):
            # the process is going away with its memory: unloading would only delay
            # the exit its nanny waits for
            return
        contexts = worker.extensions.get(EXTENSION)
        if isinstance(contexts, WorkerContexts):
            await contexts.remove(self.spec.name)


class WorkerContexts(WorkerPlugin):
    """The contexts of one worker, and its side of the conversation with the router.

    It is created by the first :class:`ContextPlugin` set up on a worker and added to
    the worker's plugins (for the task transitions) and handlers
    (``dask_context_evict``, ``dask_context_state``).

    Parameters
    ----------
    worker
        The worker.
    cache
        Its cache.
    device, job
        What the router is told: the default device, and the batch job the worker
        runs in (scale-in retires a job's workers together).
    """

    name = "dask-context"

    def __init__(
        self, worker: Worker, cache: ContextCache, device: str, job: str | None, stager: Stager
    ):
        self.worker = worker
        self.cache = cache
        self.stager = stager
        self.device = device
        self.job = job
        # keys of running annotated tasks -> the contexts they called get_context for
        self._used: dict[Hashable, set[str]] = {}
        # (task group, "uses" or "unused", context) already reported to the router
        self._reported: set[tuple[str, str, str]] = set()
        # keys sent back to the scheduler after a failed load, and when
        self._rescheduled: dict[Hashable, float] = {}
        # keys of unmarked tasks sent back to the router instead of loading here, and when
        self._sent_back: dict[Hashable, float] = {}
        # whether the scheduler runs the router (set when this worker announces, or
        # when the router surveys it): without one, nothing would route a task sent back
        self.routed = False
        self._seq = 0
        self._seq_lock = threading.Lock()

    # ------------------------------------------------------------ specs
    async def add(self, spec: ContextSpec) -> None:
        await asyncio.to_thread(self.cache.add, spec)
        # the staged files of a replaced spec are the old spec's
        await self.stager.discard(spec.name, spec.token)
        await self.announce()
        if spec.eager:
            self.cache.load_in_background(spec.name)

    async def remove(self, name: str) -> None:
        await asyncio.to_thread(self.cache.remove, name)
        await self.stager.discard(name)
        self.emit({"action": "removed", "context": name})

    async def announce(self) -> None:
        """Tell the router (if there is one) what this worker holds and can load."""
        if await router_present(self.worker.scheduler):
            self.routed = True
            await self.worker.scheduler.dask_context_worker(worker=self.worker.address, **self.state())
        else:
            logger.debug("No dask-context router on the scheduler: contexts are not routed")

    def state(self) -> dict[str, Any]:
        """Scheduler-facing snapshot (what the ``dask_context_state`` handler answers).

        Snapshots reach the router by two roads (events on the worker's batched
        stream, replies and calls over RPC) that do not keep their order: ``seq``
        grows with every snapshot, so the router keeps only the newest and its
        record of the worker is never rolled back to an older state.
        """
        with self._seq_lock:
            self._seq += 1
            return {
                "seq": self._seq,
                "budget": self.cache.budget,
                "device": self.device,
                "job": self.job,
                "specs": self.cache.specs(),
                "resident": self.cache.resident_bytes(),
                "loading": self.cache.loading(),
                "host": self.cache.host_bytes(),
            }

    def surveyed(self) -> dict[str, Any]:
        """Handler ``dask_context_state``: the router asks what this worker holds."""
        self.routed = True
        return self.state()

    def warm(self, name: str) -> None:
        """Handler: the router chose this worker for ``name``: load it in the background.

        Tasks of the context come only once it is loaded, so a worker preempted
        while it loads takes no task with it.
        """
        if name in self.cache.names() and name not in self.cache.resident_bytes() \
                and name not in self.cache.loading():
            self.cache.load_in_background(name)

    async def evict(self, names: list[str]) -> list[str]:
        """Handler: evict ``names`` (those no task here needs), off the event loop."""
        return await asyncio.to_thread(self.cache.evict_unused, names)

    def emit(self, msg: dict[str, Any]) -> None:
        """Send a cache event to the scheduler with a snapshot of this worker's
        contexts (the exception, pickled, on failures)."""
        exc = msg.pop("exc", None)
        if exc is not None:
            msg["payload"] = error_payload(exc)
        msg.update(self.state())
        self.worker.log_event(TOPIC, msg)

    # ------------------------------------------------------------ tasks
    def get(self, name: str) -> Any:
        """:func:`get_context` on this worker."""
        # a loader asking for another context is part of a load, not the task's use
        key = None if self.cache.within_load() else _compat.current_key()
        wanted = None
        if key is not None:
            annotations = _compat.task_annotations(self.worker, key)
            wanted = annotations.get("context")
            if wanted is not None:
                self._used.setdefault(key, set()).add(name)
            if wanted != name:
                self._report(key, "uses", name)
                if wanted is None and self._send_back(key, name, annotations):
                    # loading here, on a worker nobody chose, would thrash the budget:
                    # the router, told above, routes the task with the rest of its group
                    raise Reschedule()
        try:
            return self.cache.get(name, key)
        except UnknownContextError:
            raise
        except Exception:
            if wanted == name and self._reschedule_once(key):
                # a failed load here does not fail the task: the router sends it to
                # another worker, and fails it only when the context fails everywhere
                raise Reschedule() from None
            raise

    def _report(self, key: Hashable, action: str, name: str) -> None:
        """Tell the router, once per task group, that its tasks use (or do not use) ``name``."""
        group = key_split_group(key)
        if (group, action, name) not in self._reported:
            self._reported.add((group, action, name))
            self.worker.log_event(
                TOPIC, {"action": action, "context": name, "group": group, "key": plain_key(key)}
            )

    def _send_back(self, key: Hashable, name: str, annotations: dict[str, Any]) -> bool:
        """Whether the unmarked task ``key``, asking for ``name``, goes back to the router."""
        routed = self.routed and not annotations.get(UNROUTED)
        if not routed:
            return False  # the common case without a router: nothing more to look at
        group = key_split_group(key)
        cache = self.cache
        go = send_back_unmarked(
            routed=routed,
            known=name in cache.names(),
            warm=name in cache.resident_bytes() or name in cache.host_bytes() or name in cache.loading(),
            sent_back_before=key in self._sent_back,
            other_contexts={c for g, a, c in list(self._reported) if g == group and a == "uses"} - {name},
        )
        if go:
            now = time.monotonic()
            # a key is forgotten after a while only so that the record stays small
            self._sent_back = {k: t for k, t in self._sent_back.items() if now - t < SENT_BACK_MEMORY}
            self._sent_back[key] = now
            logger.debug("Task %s asks for context %r, cold here: sent back to the router", key, name)
        return go

    def _reschedule_once(self, key: Hashable) -> bool:
        now = time.monotonic()
        retry = self.cache.failed_load_retry
        self._rescheduled = {k: t for k, t in self._rescheduled.items() if now - t < retry}
        if key in self._rescheduled:
            return False
        self._rescheduled[key] = now
        return True

    def transition(self, key: Hashable, start: str, finish: str, **kwargs: Any) -> None:
        if start not in ("executing", "long-running"):
            return
        used = self._used.pop(key, None)
        if finish != "memory":
            return
        wanted = _compat.task_annotations(self.worker, key).get("context")
        if isinstance(wanted, str) and wanted not in (used or ()):
            # routed as needing a context but never asked for it: the router
            # stops holding back the rest of its group
            self._report(key, "unused", wanted)


#: seconds a worker remembers the unmarked tasks it sent back (each goes back once)
SENT_BACK_MEMORY = 3600.0


def send_back_unmarked(
    routed: bool, known: bool, warm: bool, sent_back_before: bool, other_contexts: set[str]
) -> bool:
    """Whether an unmarked task asking for a context goes back to the router.

    An unmarked task reaches whichever worker Dask chose. Loading its context there
    evicts what the router placed (under a budget, every worker ends up loading
    every context); sent back once (``distributed.Reschedule``), it is routed with
    the rest of its group, which the router learns from the same call. It runs
    where it is when there is no router to route it (or the router said it would
    not route it: the ``UNROUTED`` annotation), when its context is unknown
    (``get_context`` raises), warm here (or loading, or in host memory), when it was
    sent back once already (it never bounces twice off one worker), and when its
    group asks for several contexts (the router routes no such group).

    >>> send_back_unmarked(True, True, False, False, set())
    True
    >>> send_back_unmarked(False, True, False, False, set())  # no router
    False
    >>> send_back_unmarked(True, True, True, False, set())  # warm here
    False
    >>> send_back_unmarked(True, True, False, True, set())  # sent back before
    False
    >>> send_back_unmarked(True, True, False, False, {"other"})  # several contexts
    False
    """
    return routed and known and not warm and not sent_back_before and not other_contexts


_creating: dict[int, asyncio.Future[WorkerContexts]] = {}


async def worker_contexts(worker: Worker) -> WorkerContexts:
    """The worker's :class:`WorkerContexts`, created on first call.

    Creation asks the router for the worker settings (a restarted worker gets the
    ones the cluster was given) and looks at the GPUs (off the event loop, without
    importing torch). Concurrent callers (one plugin per context) share the one
    creation.
    """
    contexts = worker.extensions.get(EXTENSION)
    if isinstance(contexts, WorkerContexts):
        return contexts
    pending = _creating.get(id(worker))
    if pending is None:
        pending = asyncio.ensure_future(_create(worker))
        _creating[id(worker)] = pending
    try:
        return await asyncio.shield(pending)
    finally:
        _creating.pop(id(worker), None)


async def _create(worker: Worker) -> WorkerContexts:
    from distributed.core import Status

    from dask_context.errors import SettingError

    try:
        settings = await _settings(worker)
    except SettingError as exc:
        # distributed only logs a plugin's failed setup: the worker would stay, half
        # set up (no budget, get_context asking for register), so it leaves instead
        logger.critical("dask-context: invalid setting on worker %s, which closes: %s",
                        worker.address, exc)
        if worker.status != Status.init:
            # in the background: a worker cannot close from inside its own start
            # (plugins of a joining worker are set up while it registers)
            worker.loop.add_callback(worker.close, nanny=True,
                                     reason="dask-context-invalid-setting")
        # (a worker still in init fails to start on this error by itself)
        raise
    retry = config.get_seconds("worker.failed-load-retry", settings["failed-load-retry"])
    threads = settings["torch-threads"] or worker.state.nthreads
    # NVML or nvidia-smi, never torch: a worker whose contexts do not use torch
    # must not pay for importing it (the cache sets torch's threads once it is imported)
    gpus = await asyncio.to_thread(devices.discover)
    own_first = devices.visible_ids(os.environ.get("CUDA_VISIBLE_DEVICES")) is not None
    device = devices.choose_device(settings["device"], gpus, own_first)
    memory_limit = worker.memory_manager.memory_limit
    budget = devices.memory_budget(settings, device, gpus, memory_limit)
    host_budget = devices.host_budget(settings["host-memory-budget"], device, memory_limit)
    holder: list[WorkerContexts] = []
    stager = Stager(
        worker,
        node=str(settings["node"] or socket.gethostname()),
        root=settings["staging-dir"] or os.path.join(tempfile.gettempdir(), "dask-context-files"),
    )
    cache = ContextCache(
        budget=budget,
        device=device,
        emit=lambda msg: holder[0].emit(msg),
        failed_load_retry=retry,
        running=lambda: _compat.running_keys(worker),
        assigned=lambda: _compat.assigned_contexts(worker),
        gpu_free=[gpu.free or 0 for gpu in gpus],
        stage=stager.stage,
        host_budget=host_budget,
        torch_threads=int(threads),
        thread_context=lambda: _compat.as_worker(worker),
    )
    contexts = WorkerContexts(worker, cache, device, _compat.batch_job(), stager)
    holder.append(contexts)
    worker.extensions[EXTENSION] = contexts
    worker.handlers["dask_context_evict"] = contexts.evict
    worker.handlers["dask_context_warm"] = contexts.warm
    worker.handlers["dask_context_state"] = contexts.surveyed
    worker.handlers.update(stager.handlers())
    await worker.plugin_add(contexts, name=WorkerContexts.name)
    worker.log_event(TOPIC, {"action": "hello", "budget": budget, "device": device,
                             "job": contexts.job, "host_budget": host_budget})
    logger.info(
        "dask-context on %s: device %s, memory budget %s, host budget %s",
        worker.address, device, "unlimited" if math.isinf(budget) else format_bytes(int(budget)),
        format_bytes(int(host_budget)),
    )
    return contexts


async def _settings(worker: Worker) -> dict[str, Any]:
    """This worker's settings, as the router sees fit, all checked.

    A worker restarted by its nanny, or started later by the cluster, may have lost
    settings made with ``dask.config.set`` around the cluster's creation (the nanny
    copies Dask's config shallowly); the router hands back the ones that worker's
    nanny, or the cluster, had before.

    Raises
    ------
    SettingError
        If a setting of this worker, or one handed back, cannot be used.
    """
    settings = config.worker_settings()
    # before the router hears of them: a bad value stops this worker instead of
    # becoming the setting the router hands to the workers that join after it
    config.check_worker(settings)
    if not await router_present(worker.scheduler):
        return settings
    effective = await worker.scheduler.dask_context_settings(
        worker=worker.address, nanny=worker.nanny, settings=settings
    )
    config.check_worker(effective)
    return effective


async def router_present(scheduler: Any) -> bool:
    """Whether the scheduler runs the router (``scheduler`` is an rpc to it).

    A call to a handler the scheduler lacks returns None (and logs a warning there)
    rather than raising, so callers ask first.
    """
    return bool(await scheduler.get_metadata(keys=ROUTER_METADATA, default=False))


def get_context(name: str) -> Any:
    """Return the context ``name`` from inside a task, loading it if needed.

    The first call on a worker runs the context's loader (in the task's thread);
    later calls, from any task or computation, return the same object.

    Parameters
    ----------
    name
        A context registered with :func:`dask_context.register` (or declared in
        the ``dask-context.contexts`` setting).

    Raises
    ------
    UnknownContextError
        If no context of that name is registered.
    NotRegisteredError
        If called outside a Dask worker, or on a worker without dask-context.

    Examples
    --------
    .. code-block:: python

        def verify(claims):
            model = get_context("verifier")
            return judge(model, claims)
    """
    try:
        worker = get_worker()
    except ValueError:
        raise NotRegisteredError(
            f"get_context({name!r}) must run inside a task on a Dask worker"
        ) from None
    contexts = worker.extensions.get(EXTENSION)
    if not isinstance(contexts, WorkerContexts):
        raise NotRegisteredError(
            f"dask-context is not set up on worker {worker.address}: "
            "call dask_context.register(client, ...) before computing"
        )
    return contexts.get(name)
