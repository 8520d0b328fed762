"""The WorkerPlugin: one per context, all sharing one :class:`ContextCache` per worker."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

from dask.utils import format_bytes, parse_bytes, parse_timedelta
from distributed import WorkerPlugin, get_worker

from dask_context import _compat, config
from dask_context.cache import ContextCache
from dask_context.errors import NotRegisteredError
from dask_context.policy import resolve_device
from dask_context.spec import ContextSpec

if TYPE_CHECKING:
    from distributed import Worker

logger = logging.getLogger(__name__)

TOPIC = "dask-context"
EXTENSION = "dask-context"
# scheduler metadata set by the scheduler plugin while it runs
ROUTER_METADATA = ["dask-context", "router"]


class ContextPlugin(WorkerPlugin):
    """Make one context available on every worker, now and in the future.

    Registering it (``client.register_plugin(ContextPlugin(spec))``, or
    :func:`dask_context.register`, which also registers the scheduler plugin) runs
    :meth:`setup` on every worker, including workers that join later. Setup only
    records the spec, unless the spec is ``eager``: the load itself happens on first
    use, in the thread of the task that asks for it. Setup also tells the scheduler
    plugin (:class:`~dask_context.scheduler.ContextRouter`, register it first) about
    the context, so routing works without :func:`dask_context.register` too.

    Parameters
    ----------
    spec
        The context to provide.
    """

    def __init__(self, spec: ContextSpec):
        if not isinstance(spec, ContextSpec):
            raise TypeError(f"ContextPlugin takes a ContextSpec, got {spec!r}")
        self.spec = spec
        self.name = f"dask-context-{spec.name}"

    async def setup(self, worker: Worker) -> None:
        cache = await worker_cache(worker)
        cache.add(self.spec)
        # tell the scheduler plugin (if there is one) about the context before the
        # registration returns, so that routing works even when the plugins were
        # registered by hand (client.register_plugin) rather than with register()
        if await worker.scheduler.get_metadata(keys=ROUTER_METADATA, default=False):
            await worker.scheduler.dask_context_register(specs=[self.spec.info()], known_ok=True)
        if self.spec.eager:
            cache.load_in_background(self.spec.name)

    def teardown(self, worker: Worker) -> None:
        cache = worker.extensions.get(EXTENSION)
        if isinstance(cache, ContextCache):
            cache.remove(self.spec.name)


_creating: dict[int, asyncio.Future[ContextCache]] = {}


async def worker_cache(worker: Worker) -> ContextCache:
    """The worker's cache, created on first call.

    Creating it imports torch, sets its thread count and looks at the GPUs, all in
    a thread so that the event loop keeps serving heartbeats meanwhile. Concurrent
    callers (one plugin per context) share the one creation.
    """
    cache = worker.extensions.get(EXTENSION)
    if isinstance(cache, ContextCache):
        return cache
    pending = _creating.get(id(worker))
    if pending is None:
        pending = asyncio.ensure_future(_create_cache(worker))
        _creating[id(worker)] = pending
    try:
        return await asyncio.shield(pending)
    finally:
        _creating.pop(id(worker), None)


async def _create_cache(worker: Worker) -> ContextCache:
    gpu_free, gpu_total = await asyncio.to_thread(_probe_torch, worker.state.nthreads)
    device = resolve_device(config.get("worker.device"), gpu_free)
    budget = _budget(device, gpu_total, worker.memory_manager.memory_limit)
    cache = ContextCache(
        budget=budget,
        device=device,
        emit=lambda msg: worker.log_event(TOPIC, msg),
        failed_load_retry=parse_timedelta(config.get("worker.failed-load-retry")),
        running=lambda: _compat.running_keys(worker),
        gpu_free=gpu_free,
    )
    worker.extensions[EXTENSION] = cache
    worker.log_event(TOPIC, {"action": "hello", "budget": budget, "device": device})
    logger.info(
        "dask-context on %s: device %s, memory budget %s",
        worker.address, device, "unlimited" if math.isinf(budget) else format_bytes(int(budget)),
    )
    return cache


def _probe_torch(nthreads: int) -> tuple[list[int], list[int]]:
    """Set torch's intra-op threads; return free and total bytes per visible GPU."""
    try:
        import torch
    except ImportError:
        return [], []
    threads = config.get("worker.torch-threads") or nthreads
    torch.set_num_threads(int(threads))
    if not torch.cuda.is_available():
        return [], []
    info = [torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count())]
    return [free for free, _ in info], [total for _, total in info]


def _budget(device: str, gpu_total: list[int], memory_limit: int | None) -> float:
    """The worker's memory budget for contexts, from ``worker.memory-budget``.

    Examples
    --------
    >>> import dask
    >>> _budget("cpu", [], memory_limit=10_000)
    8000.0
    >>> _budget("cuda:1", [100, 1000], memory_limit=10_000)
    800.0
    >>> _budget("cpu", [], memory_limit=None)
    inf
    >>> with dask.config.set({"dask-context.worker.memory-budget": "1 kiB"}):
    ...     _budget("cpu", [], memory_limit=10_000)
    1024.0
    """
    setting = config.get("worker.memory-budget")
    if setting not in ("auto", None):
        return float(parse_bytes(setting) if isinstance(setting, str) else setting)
    if device.startswith("cuda"):
        total = gpu_total[int(device.split(":")[1])]
    else:
        total = memory_limit or math.inf
    return total * float(config.get("worker.memory-fraction"))


def get_context(name: str) -> Any:
    """Return the context ``name`` from inside a task, loading it if needed.

    The first call on a worker runs the context's loader (in the task's thread);
    later calls, from any task or computation, return the same object.

    Parameters
    ----------
    name
        A context registered with :func:`dask_context.register`.

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
    cache = worker.extensions.get(EXTENSION)
    if not isinstance(cache, ContextCache):
        raise NotRegisteredError(
            f"dask-context is not set up on worker {worker.address}: "
            "call dask_context.register(client, ...) before computing"
        )
    return cache.get(name, key=_compat.current_key())
