"""The contexts one worker holds: load once, pin to a device, keep, evict.

:class:`ContextCache` knows nothing of Dask's worker; :mod:`dask_context.worker`
creates one per worker and wires it in. It is thread-safe: tasks call :meth:`get`
from the worker's executor threads, and loads run in the calling thread (or a
background thread for eager loads), never on the event loop.
"""

from __future__ import annotations

import gc
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import Any

from dask.sizeof import sizeof
from dask.utils import format_bytes

from dask_context.errors import ContextTooLargeError, UnknownContextError
from dask_context.policy import Resident, choose_victims, resolve_device
from dask_context.spec import ContextSpec

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]


@sizeof.register_lazy("torch")
def _register_torch_sizeof() -> None:
    import torch

    @sizeof.register(torch.Tensor)
    def _tensor(t: torch.Tensor) -> int:
        return t.element_size() * t.nelement()

    @sizeof.register(torch.nn.Module)
    def _module(m: torch.nn.Module) -> int:
        tensors = {id(t): t for t in [*m.parameters(), *m.buffers()]}
        return sum(_tensor(t) for t in tensors.values())


@dataclass
class Entry:
    """A loaded context."""

    obj: Any
    nbytes: int
    device: str
    load_seconds: float
    last_used: float
    users: set[Hashable] = field(default_factory=set)


def place(obj: Any, device: str) -> Any:
    """Move the torch modules and tensors in ``obj`` (or directly inside a tuple,
    list or dict in ``obj``) to ``device``; leave everything else as it is.

    Examples
    --------
    >>> place({"template": "Claim: {claim}"}, "cpu")
    {'template': 'Claim: {claim}'}
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return obj
    if isinstance(obj, (torch.nn.Module, torch.Tensor)):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: place(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [place(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def release_device_memory() -> None:
    """Return freed memory to the OS and the CUDA driver after an eviction."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class ContextCache:
    """Contexts held by one worker process.

    Parameters
    ----------
    budget
        Bytes of contexts this worker may hold at once.
    device
        Device used for specs whose device is ``"auto"``.
    emit
        Called with a plain dict for every state change ("loading", "loaded",
        "evicted", "failed"); the worker plugin forwards these to the scheduler.
    failed_load_retry
        Seconds during which a failed load is re-raised instead of retried.
    running
        Returns the keys of the tasks running now; contexts used by them are never
        evicted.
    gpu_free
        Free bytes per visible GPU, for specs that ask for ``"cuda"``.

    Examples
    --------
    >>> events = []
    >>> cache = ContextCache(budget=10_000, emit=events.append)
    >>> cache.add(ContextSpec("greeting", str, args=["hello"]))
    >>> cache.get("greeting")
    'hello'
    >>> [e["action"] for e in events]
    ['loading', 'loaded']
    >>> cache.get("greeting"), len(events)  # warm: no second load
    ('hello', 2)
    >>> cache.get("nope")
    Traceback (most recent call last):
    ...
    dask_context.errors.UnknownContextError: unknown context 'nope': registered contexts are 'greeting'; register it with dask_context.register(client, ContextSpec(...))
    """

    def __init__(
        self,
        budget: float = float("inf"),
        device: str = "cpu",
        emit: Emit = lambda msg: None,
        failed_load_retry: float = 30.0,
        running: Callable[[], Collection[Hashable]] = frozenset,
        gpu_free: list[int] | None = None,
    ):
        self.budget = budget
        self.device = device
        self.failed_load_retry = failed_load_retry
        self._emit = emit
        self._running = running
        self._gpu_free = gpu_free or []
        self._specs: dict[str, ContextSpec] = {}
        self._entries: dict[str, Entry] = {}
        self._loading: set[str] = set()
        self._failures: dict[str, tuple[BaseException, Any, float]] = {}
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self.loads: dict[str, int] = {}

    # ------------------------------------------------------------------ specs
    def add(self, spec: ContextSpec) -> None:
        """Make ``spec`` loadable here (replacing a spec of the same name)."""
        with self._lock:
            if spec.name in self._specs:
                self.evict(spec.name, reason="replaced")
            self._specs[spec.name] = spec
            self._failures.pop(spec.name, None)
            self._load_locks.setdefault(spec.name, threading.Lock())

    def remove(self, name: str) -> None:
        """Forget ``name`` and free its memory."""
        with self._lock:
            self.evict(name, reason="unregistered")
            self._specs.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._specs)

    # ------------------------------------------------------------------ use
    def get(self, name: str, key: Hashable | None = None) -> Any:
        """Return the context ``name``, loading it first if this worker lacks it.

        Parameters
        ----------
        name
            A registered context.
        key
            The calling task's key; the context is not evicted while it runs.
        """
        if name not in self._specs:
            raise UnknownContextError(name, list(self._specs))
        entry = self._touch(name, key)
        if entry is not None:
            return entry.obj
        with self._load_locks[name]:
            # another thread may have loaded it while this one waited
            entry = self._touch(name, key)
            if entry is not None:
                return entry.obj
            self._raise_recent_failure(name)
            return self._load(self._specs[name], key).obj

    def load_in_background(self, name: str) -> threading.Thread:
        """Start loading ``name`` in a daemon thread (eager contexts)."""

        def run() -> None:
            try:
                self.get(name)
            except Exception:
                logger.exception("Eager load of context %r failed", name)

        thread = threading.Thread(target=run, name=f"dask-context-load-{name}", daemon=True)
        thread.start()
        return thread

    def _touch(self, name: str, key: Hashable | None) -> Entry | None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.last_used = time.monotonic()
                if key is not None:
                    entry.users.add(key)
                    if len(entry.users) > 256:
                        entry.users &= set(self._running())
            return entry

    def _raise_recent_failure(self, name: str) -> None:
        failure = self._failures.get(name)
        if failure is None:
            return
        exc, tb, when = failure
        if time.monotonic() - when < self.failed_load_retry:
            raise exc.with_traceback(tb)
        del self._failures[name]

    # ------------------------------------------------------------------ load
    def _load(self, spec: ContextSpec, key: Hashable | None) -> Entry:
        device = resolve_device(
            self.device if spec.device == "auto" else spec.device, self._gpu_free
        )
        estimate = spec.memory or 0
        self._make_room(spec.name, estimate)
        with self._lock:
            self._loading.add(spec.name)
        self._emit({"action": "loading", "context": spec.name, "key": _plain(key)})
        start = time.perf_counter()
        try:
            obj = self._call_loader(spec, device)
            nbytes = max(int(sizeof(obj)), estimate)
            if nbytes > self.budget:
                del obj
                raise ContextTooLargeError(
                    f"context {spec.name!r} takes {format_bytes(nbytes)} once loaded, "
                    "more than the memory budget of this worker "
                    f"({format_bytes(int(self.budget))})"
                )
        except BaseException as exc:
            with self._lock:
                self._loading.discard(spec.name)
                self._failures[spec.name] = (exc, exc.__traceback__, time.monotonic())
            release_device_memory()
            exc.add_note(f"dask-context: loading context {spec.name!r} failed")
            self._emit(
                {"action": "failed", "context": spec.name, "error": repr(exc),
                 "resident": self.resident_bytes()}
            )
            raise
        seconds = time.perf_counter() - start
        entry = Entry(obj, nbytes, device, seconds, time.monotonic())
        if key is not None:
            entry.users.add(key)
        with self._lock:
            self._loading.discard(spec.name)
            self._entries[spec.name] = entry
            self.loads[spec.name] = self.loads.get(spec.name, 0) + 1
        if nbytes > estimate:
            # the estimate was low: make room for what the context really takes
            self._make_room(spec.name, 0)
        logger.info(
            "Loaded context %r on %s in %.2f s (%s)",
            spec.name, device, seconds, format_bytes(nbytes),
        )
        self._emit(
            {"action": "loaded", "context": spec.name, "key": _plain(key),
             "seconds": seconds, "nbytes": nbytes, "device": device,
             "resident": self.resident_bytes()}
        )
        return entry

    def _call_loader(self, spec: ContextSpec, device: str) -> Any:
        kwargs = dict(spec.kwargs)
        if "device" not in kwargs and _accepts_device(spec.loader):
            kwargs["device"] = device
        try:
            obj = spec.loader(*spec.args, **kwargs)
        except Exception as exc:
            if not _out_of_memory(exc) or not self._evict_unused():
                raise
            logger.warning("Out of memory loading %r; evicted idle contexts, retrying", spec.name)
            obj = spec.loader(*spec.args, **kwargs)
        return place(obj, device)

    # ------------------------------------------------------------------ evict
    def _make_room(self, name: str, needed: int) -> None:
        """Evict least recently used contexts so that ``needed`` bytes fit."""
        with self._lock:
            running = set(self._running())
            held = {
                n: Resident(e.nbytes, e.last_used)
                for n, e in self._entries.items()
                if n != name
            }
            if name in self._entries:
                needed += self._entries[name].nbytes
            for e in self._entries.values():
                e.users &= running
            protected = {n for n, e in self._entries.items() if e.users}
            if needed > self.budget:
                raise ContextTooLargeError(
                    f"context {name!r} needs {format_bytes(needed)} but the memory "
                    f"budget of this worker is {format_bytes(int(self.budget))}; raise "
                    "dask-context.worker.memory-budget or use a larger worker"
                )
            victims = choose_victims(held, needed, self.budget, protected)
        for victim in victims:
            self.evict(victim, reason="memory budget")
        left = self.used_bytes() + (0 if name in self._entries else needed)
        if left > self.budget:
            logger.warning(
                "Contexts on this worker take %s, over the budget of %s, because "
                "running tasks use them",
                format_bytes(left), format_bytes(int(self.budget)),
            )

    def _evict_unused(self) -> bool:
        running = set(self._running())
        with self._lock:
            idle = [n for n, e in self._entries.items() if not e.users & running]
        for name in idle:
            self.evict(name, reason="out of memory")
        return bool(idle)

    def evict(self, name: str, reason: str = "requested") -> bool:
        """Drop ``name`` if it is loaded; return whether it was."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            return False
        nbytes = entry.nbytes
        del entry
        release_device_memory()
        logger.info("Evicted context %r (%s): %s", name, format_bytes(nbytes), reason)
        self._emit(
            {"action": "evicted", "context": name, "reason": reason,
             "resident": self.resident_bytes()}
        )
        return True

    def clear(self) -> None:
        """Evict everything (worker teardown)."""
        for name in list(self._entries):
            self.evict(name, reason="teardown")

    # ------------------------------------------------------------------ state
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def resident_bytes(self) -> dict[str, int]:
        """Loaded contexts and their sizes, as sent to the scheduler."""
        with self._lock:
            return {n: e.nbytes for n, e in self._entries.items()}


def _accepts_device(loader: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(loader).parameters
    except (TypeError, ValueError):
        return False
    return "device" in params


def _out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = (MemoryError,) + ((torch.OutOfMemoryError,) if torch is not None else ())
    return isinstance(exc, oom)


def _plain(key: Hashable | None) -> Any:
    """Task keys are str or tuples; events must be msgpack-able."""
    return list(key) if isinstance(key, tuple) else key
