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
import math
import threading
import time
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import Any

from dask.sizeof import sizeof
from dask.utils import format_bytes

from dask_context import _compat
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
    torch = _compat.torch_if_imported()
    if torch is not None and isinstance(obj, (torch.nn.Module, torch.Tensor)):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: place(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [place(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def release_device_memory() -> None:
    """Return freed memory to the allocator and the CUDA driver after an eviction."""
    gc.collect()
    torch = _compat.torch_if_imported()
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
        A "failed" event carries the exception itself under ``"exc"``.
    failed_load_retry
        Seconds during which a failed load is re-raised instead of retried.
    running
        Returns the keys of the tasks running now; contexts used by them are never
        evicted.
    assigned
        Returns the contexts that tasks assigned to this worker (running or about
        to run) ask for; they are never evicted either.
    gpu_free
        Free bytes per visible GPU, for specs that ask for ``"cuda"``.
    stage
        For specs with ``files``: returns the local directory to pass to the loader
        (the worker stages a node-local copy); by default the spec's own path.

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
        budget: float = math.inf,
        device: str = "cpu",
        emit: Emit = lambda msg: None,
        failed_load_retry: float = 30.0,
        running: Callable[[], Collection[Hashable]] = frozenset,
        assigned: Callable[[], Collection[str]] = frozenset,
        gpu_free: list[int] | None = None,
        stage: Callable[[ContextSpec], str] = lambda spec: spec.files,
    ):
        self.budget = budget
        self._stage = stage
        self.device = device
        self.failed_load_retry = failed_load_retry
        self._emit = emit
        self._running = running
        self._assigned = assigned
        self._gpu_free = gpu_free or []
        self._specs: dict[str, ContextSpec] = {}
        # bumped whenever a name's spec is replaced or removed: a load that started
        # under an older generation is thrown away when it ends
        self._generation: dict[str, int] = {}
        self._entries: dict[str, Entry] = {}
        self._loading: set[str] = set()
        self._failures: dict[str, tuple[BaseException, Any, float]] = {}
        self._measured: dict[str, int] = {}
        self._lock = threading.RLock()
        self._load_locks: dict[str, threading.Lock] = {}
        self.loads: dict[str, int] = {}

    # ------------------------------------------------------------------ specs
    def add(self, spec: ContextSpec) -> None:
        """Make ``spec`` loadable here (replacing a spec of the same name)."""
        with self._lock:
            old = self._specs.get(spec.name)
            if old is not None and old.token == spec.token:
                return
            self._generation[spec.name] = self._generation.get(spec.name, 0) + 1
            self._specs[spec.name] = spec
            self._failures.pop(spec.name, None)
            self._measured.pop(spec.name, None)
            self._load_locks.setdefault(spec.name, threading.Lock())
        if old is not None:
            self.evict(spec.name, reason="replaced")

    def remove(self, name: str) -> None:
        """Forget ``name`` and free its memory (a load under way is thrown away)."""
        with self._lock:
            self._specs.pop(name, None)
            self._generation[name] = self._generation.get(name, 0) + 1
            self._failures.pop(name, None)
            self._measured.pop(name, None)
        self.evict(name, reason="unregistered")

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> dict[str, dict[str, Any]]:
        """``ContextSpec.info()`` of each spec set up here."""
        with self._lock:
            return {n: s.info() for n, s in self._specs.items()}

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
        self._check_known(name)
        entry = self._touch(name, key)
        if entry is not None:
            return entry.obj
        with self._load_locks[name]:
            while True:
                # another thread may have loaded it while this one waited
                entry = self._touch(name, key)
                if entry is not None:
                    return entry.obj
                self._check_known(name)
                self._raise_recent_failure(name)
                with self._lock:
                    spec, generation = self._specs[name], self._generation[name]
                entry = self._load(spec, key, generation)
                if entry is not None:
                    return entry.obj
                # the spec was replaced or removed while it loaded: load the new one

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

    def failed_recently(self, name: str) -> bool:
        failure = self._failures.get(name)
        return failure is not None and time.monotonic() - failure[2] < self.failed_load_retry

    def _check_known(self, name: str) -> None:
        if name not in self._specs:
            raise UnknownContextError(name, list(self._specs))

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
    def _load(self, spec: ContextSpec, key: Hashable | None, generation: int) -> Entry | None:
        name = spec.name
        # the size measured here last time, else the spec's estimate; a context
        # declared larger than the budget is still tried (estimates can be wrong),
        # after making as much room as there is
        estimate = self._measured.get(name, spec.memory or 0)
        self._make_room(name, min(estimate, self.budget))
        with self._lock:
            self._loading.add(name)
        self._emit({"action": "loading", "context": name, "key": plain_key(key)})
        start = time.perf_counter()
        device = "cpu"
        try:
            device = resolve_device(
                self.device if spec.device == "auto" else spec.device, self._gpu_free
            )
            obj = self._call_loader(spec, device)
            nbytes = int(sizeof(obj))
            if nbytes > self.budget:
                del obj
                raise ContextTooLargeError(
                    f"context {name!r} takes {format_bytes(nbytes)} once loaded, more "
                    f"than the memory budget of this worker ({format_bytes(int(self.budget))})"
                )
        except BaseException as exc:
            self._failed(spec, exc, generation)
            raise
        seconds = time.perf_counter() - start
        entry = Entry(obj, nbytes, device, seconds, time.monotonic())
        if key is not None:
            entry.users.add(key)
        with self._lock:
            self._loading.discard(name)
            current = self._generation.get(name) == generation
            if current:
                self._entries[name] = entry
                self._measured[name] = nbytes
                self.loads[name] = self.loads.get(name, 0) + 1
        if not current:
            del entry, obj
            release_device_memory()
            logger.info("Context %r changed while it loaded: the old load is thrown away", name)
            self._emit({"action": "evicted", "context": name, "reason": "replaced while loading",
                        "resident": self.resident_bytes()})
            return None
        if nbytes > estimate:
            # the estimate was low: make room for what the context really takes
            self._make_room(name, 0)
        logger.info(
            "Loaded context %r on %s in %.2f s (%s)",
            name, device, seconds, format_bytes(nbytes),
        )
        self._emit(
            {"action": "loaded", "context": name, "key": plain_key(key),
             "seconds": seconds, "nbytes": nbytes, "device": device,
             "resident": self.resident_bytes()}
        )
        return entry

    def _failed(self, spec: ContextSpec, exc: BaseException, generation: int) -> None:
        with self._lock:
            self._loading.discard(spec.name)
            if self._generation.get(spec.name) == generation:
                self._failures[spec.name] = (exc, exc.__traceback__, time.monotonic())
        release_device_memory()
        exc.add_note(f"dask-context: loading context {spec.name!r} failed")
        logger.warning("Loading context %r failed: %r", spec.name, exc)
        self._emit(
            {"action": "failed", "context": spec.name, "error": repr(exc), "exc": exc,
             "resident": self.resident_bytes()}
        )

    def _call_loader(self, spec: ContextSpec, device: str) -> Any:
        kwargs = dict(spec.kwargs)
        if "device" not in kwargs and _accepts_device(spec.loader):
            kwargs["device"] = device
        args = (self._stage(spec), *spec.args) if spec.files is not None else spec.args
        try:
            obj = spec.loader(*args, **kwargs)
        except Exception as exc:
            if not _out_of_memory(exc) or not self._evict_unused():
                raise
            logger.warning("Out of memory loading %r; evicted idle contexts, retrying", spec.name)
            obj = spec.loader(*args, **kwargs)
        return place(obj, device)

    # ------------------------------------------------------------------ evict
    def _protected(self) -> set[str]:
        running = set(self._running())
        with self._lock:
            for e in self._entries.values():
                e.users &= running
            used = {n for n, e in self._entries.items() if e.users}
        return used | set(self._assigned())

    def _make_room(self, name: str, needed: float) -> None:
        """Evict least recently used contexts that no task here needs, so ``needed`` more bytes fit."""
        protected = self._protected()
        with self._lock:
            held = {
                n: Resident(e.nbytes, e.last_used)
                for n, e in self._entries.items()
                if n != name
            }
            if name in self._entries:
                needed += self._entries[name].nbytes
            victims = choose_victims(held, int(min(needed, self.budget)), self.budget, protected)
        for victim in victims:
            self.evict(victim, reason="memory budget")
        left = self.used_bytes() + (0 if name in self._entries else needed)
        if left > self.budget:
            logger.warning(
                "Contexts on this worker take %s, over the budget of %s, because "
                "tasks here use them",
                format_bytes(int(left)), format_bytes(int(self.budget)),
            )

    def _evict_unused(self) -> bool:
        protected = self._protected()
        with self._lock:
            idle = [n for n in self._entries if n not in protected]
        for name in idle:
            self.evict(name, reason="out of memory")
        return bool(idle)

    def evict_unused(self, names: Collection[str]) -> list[str]:
        """Evict those of ``names`` that no task here needs (the router's request).

        Returns the names that are not resident afterwards.
        """
        protected = self._protected()
        out = []
        for name in names:
            if name in protected:
                continue
            self.evict(name, reason="router")
            out.append(name)
        return out

    def evict(self, name: str, reason: str = "requested") -> bool:
        """Drop ``name`` if it is loaded; return whether it was."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            return False
        nbytes = entry.nbytes
        start = time.perf_counter()
        del entry
        release_device_memory()
        seconds = time.perf_counter() - start
        logger.info("Evicted context %r (%s): %s", name, format_bytes(nbytes), reason)
        self._emit(
            {"action": "evicted", "context": name, "reason": reason, "seconds": seconds,
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

    def loading(self) -> list[str]:
        with self._lock:
            return sorted(self._loading)


def _accepts_device(loader: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(loader).parameters
    except (TypeError, ValueError):
        return False
    return "device" in params


def _out_of_memory(exc: BaseException) -> bool:
    torch = _compat.torch_if_imported()
    oom = (MemoryError,) + ((torch.OutOfMemoryError,) if torch is not None else ())
    return isinstance(exc, oom)


def plain_key(key: Hashable | None) -> Any:
    """Task keys are str or tuples; events must be msgpack-able."""
    return list(key) if isinstance(key, tuple) else key
