"""The contexts one worker holds: load once, pin to a device, keep, evict.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.

:class:`ContextCache` knows nothing of Dask's worker; :mod:`dask_context.worker`
creates one per worker and wires it in. It is thread-safe: tasks call :meth:`get`
from the worker's executor threads, and loads run in the calling thread (or a
background thread for eager loads), never on the event loop.

Contexts on a GPU have a second tier: when one is evicted to make room (for the
memory budget, after an out-of-memory error, or at the router's request), its
tensors are copied to host memory (pinned where possible) within a host budget
instead of being dropped, and the next :meth:`ContextCache.get` copies them back,
which costs a host-to-device copy instead of a read from storage (as vLLM's sleep
mode does). Host copies beyond the host budget are dropped, least recently used
first. A :class:`~dask_context.tiers.Mover` does the copying
(:class:`~dask_context.tiers.TorchMover` on real GPUs, a fake one in tests that run
on CPUs).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Collection, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dask.sizeof import sizeof
from dask.utils import format_bytes

from dask_context import _compat
from dask_context.errors import ContextCycleError, ContextTooLargeError, UnknownContextError
from dask_context.policy import Resident, choose_victims, resolve_device
from dask_context.spec import ContextSpec
from dask_context.state import underestimate
from dask_context.tiers import Mover, TorchMover, is_out_of_memory

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]

# Evictions that make room on a device: the context goes to the host tier (if it has
# one) rather than away. Replaced, unregistered, explicitly evicted contexts go away.
DEMOTE_REASONS = frozenset({"memory budget", "out of memory", "router"})

@dataclass
class Entry:
    """A loaded context."""

    obj: Any
    nbytes: int
    device: str
    load_seconds: float
    last_used: float
    users: set[Hashable] = field(default_factory=set)


@dataclass
class HostCopy:
    """A context evicted from its GPU and kept in host memory.

    ``moved`` is what the :class:`Mover` moved (and moves back); ``host_nbytes`` what
    the copy takes in host memory.
    """

    obj: Any
    moved: Any
    nbytes: int
    host_nbytes: int
    device: str
    generation: int
    last_used: float


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
    host_budget
        Bytes of host memory for copies of contexts evicted from a GPU (0: none are
        kept). "loaded" events say where a context came from (``"from"``: "host" or
        "storage"), "evicted" events where it went (``"tier"``: "host" or None).
    mover
        Moves contexts between devices and host memory; :class:`TorchMover` by default.
    torch_threads
        torch's intra-op threads, set once torch is imported in this process (loaders
        import it lazily, so a worker whose contexts do not use torch never does).
    thread_context
        Entered around loads in background threads (the worker lets ``get_worker()``
        work there, as it does in tasks).

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
        host_budget: float = 0.0,
        mover: Mover | None = None,
        torch_threads: int | None = None,
        thread_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ):
        self.budget = budget
        self.host_budget = host_budget
        self._mover: Mover = mover or TorchMover()
        self._torch_threads = torch_threads
        self._torch_threads_set = False
        self._stage = stage
        self._thread_context = thread_context
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
        # loads from storage under way and the bytes each is expected to take; a
        # load whose size was never measured here runs alone (see _turn)
        self._admitted = threading.Condition(self._lock)
        self._inflight: dict[str, int] = {}
        self._turns: dict[str, int] = {}
        self._alone: str | None = None
        # per thread, the contexts whose loads it is inside, outermost first: a
        # loader may ask for other contexts (a model's loader for its tokenizer's)
        self._within = threading.local()
        # the host tier: copies of evicted contexts, the bytes reserved by copies
        # under way, and an event per context being copied to the host right now
        self._host: dict[str, HostCopy] = {}
        self._host_reserved = 0
        self._demoting: dict[str, threading.Event] = {}
        self.loads: dict[str, int] = {}
        # loads served from the host tier (not counted in ``loads``)
        self.rewarms: dict[str, int] = {}
        self._set_torch_threads()

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
            self._drop_host_copy(spec.name, reason="replaced")

    def remove(self, name: str) -> None:
        """Forget ``name`` and free its memory (a load under way is thrown away)."""
        with self._lock:
            self._specs.pop(name, None)
            self._generation[name] = self._generation.get(name, 0) + 1
            self._failures.pop(name, None)
            self._measured.pop(name, None)
        self.evict(name, reason="unregistered")
        self._drop_host_copy(name, reason="unregistered")

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
        within: list[str] = vars(self._within).setdefault("names", [])
        if name in within:
            raise ContextCycleError(
                f"loading context {within[0]!r} asks for context {name!r}, whose load "
                f"is under way in this thread ({' -> '.join([*within, name])}): a "
                "context's loader cannot use it, directly or through other loaders"
            )
        within.append(name)
        try:
            while True:
                # the turn is taken before the name's lock, so that a thread waiting
                # for its turn holds nothing that the load under way may need
                with self._turn(name) as estimate, self._load_locks[name]:
                    # another thread may have loaded it while this one waited
                    entry = self._touch(name, key)
                    if entry is not None:
                        return entry.obj
                    self._check_known(name)
                    self._raise_recent_failure(name)
                    self._wait_for_demotion(name)
                    with self._lock:
                        spec, generation = self._specs[name], self._generation[name]
                    entry = self._promote(spec, key, generation, estimate)
                    if entry is not None:
                        return entry.obj
                # the spec was replaced or removed while it loaded: load the new one
        finally:
            within.pop()

    def within_load(self) -> bool:
        """Whether the calling thread runs a loader (which may ask for other contexts)."""
        return bool(getattr(self._within, "names", None))

    def load_in_background(self, name: str) -> threading.Thread:
        """Start loading ``name`` in a daemon thread (eager contexts, warm-ups asked
        for by the router); a failure is reported like any failed load."""

        def run() -> None:
            try:
                with self._thread_context():
                    self.get(name)
            except Exception:
                logger.info("Loading context %r in the background failed", name, exc_info=True)

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

    def _wait_for_demotion(self, name: str) -> None:
        """Wait while ``name`` is being copied to the host: the copy is then the
        quickest way back."""
        with self._lock:
            demoting = self._demoting.get(name)
        if demoting is not None:
            demoting.wait()

    def _raise_recent_failure(self, name: str) -> None:
        failure = self._failures.get(name)
        if failure is None:
            return
        exc, tb, when = failure
        if time.monotonic() - when < self.failed_load_retry:
            raise exc.with_traceback(tb)
        del self._failures[name]

    # ------------------------------------------------------------------ load
    @contextlib.contextmanager
    def _turn(self, name: str) -> Iterator[int]:
        """Wait for the turn of a load of ``name``; give the bytes it is expected to
        take, counted as taken until the block ends.

        A context never measured on this worker loads alone: its estimate may be
        far too small, and two such loads at once could together overrun the
        budget before either is measured (and two first imports of a library in
        two threads can break each other). Measured ones load side by side, each
        counted at its measured size while it loads. A load that a loader asks for
        is part of the load under way in its thread: it takes its turn at once.
        """
        nested = len(self._within.names) > 1
        with self._admitted:
            self._check_known(name)
            measured = name in self._measured
            while not nested and (self._alone or (not measured and self._inflight)):
                self._admitted.wait()
                self._check_known(name)
            # the size measured here last time, else the spec's estimate, scaled up by
            # as much as the other specs' estimates fell short here
            estimate = self._measured.get(name)
            if estimate is None:
                scale = underestimate(
                    (s.memory, self._measured.get(n)) for n, s in self._specs.items()
                )
                estimate = int((self._specs[name].memory or 0) * scale)
            self._inflight[name] = estimate
            self._turns[name] = self._turns.get(name, 0) + 1
            if not measured and not nested:
                self._alone = name
        try:
            yield estimate
        finally:
            with self._admitted:
                self._turns[name] -= 1
                if not self._turns[name]:
                    del self._turns[name], self._inflight[name]
                if self._alone == name:
                    self._alone = None
                self._admitted.notify_all()

    def _load(
        self, spec: ContextSpec, key: Hashable | None, generation: int, estimate: int
    ) -> Entry | None:
        name = spec.name
        # a context declared larger than the budget is still tried (estimates can
        # be wrong), after making as much room as there is
        self._make_room(name, min(estimate, self.budget))
        self._start_loading(name, key, "storage")
        start = time.perf_counter()
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
        entry = Entry(obj, nbytes, device, time.perf_counter() - start, time.monotonic())
        del obj
        if not self._commit(name, entry, key, generation, self.loads):
            del entry
            self._discard_stale(name)
            return None
        if nbytes > estimate:
            # the estimate was low: make room for what the context really takes
            self._make_room(name, 0)
        self._loaded(name, entry, key, "storage")
        return entry

    def _promote(
        self, spec: ContextSpec, key: Hashable | None, generation: int, estimate: int
    ) -> Entry | None:
        """Bring ``spec``'s context back from the host tier, or load it when it has no host copy."""
        name = spec.name
        with self._lock:
            copy = self._host.pop(name, None)
        if copy is None:
            return self._load(spec, key, generation, estimate)
        self._make_room(name, copy.nbytes)
        self._start_loading(name, key, "host")
        start = time.perf_counter()
        moved = copy.moved
        try:
            self._retry_out_of_memory(
                name, copy.device, functools.partial(self._mover.to_device, moved)
            )
        except BaseException as exc:
            # part of it may be on the device already: drop it whole (the next try
            # loads from storage) before the failure is remembered
            del copy, moved
            self._failed(spec, exc, generation)
            raise
        entry = Entry(copy.obj, copy.nbytes, copy.device, time.perf_counter() - start,
                      time.monotonic())
        del copy, moved
        if not self._commit(name, entry, key, generation, self.rewarms):
            del entry
            self._discard_stale(name)
            return None
        self._loaded(name, entry, key, "host")
        return entry

    def _start_loading(self, name: str, key: Hashable | None, source: str) -> None:
        with self._lock:
            self._loading.add(name)
        self._emit({"action": "loading", "context": name, "key": plain_key(key), "from": source})

    def _commit(
        self, name: str, entry: Entry, key: Hashable | None, generation: int, counts: dict[str, int]
    ) -> bool:
        """Make ``entry`` resident, unless the spec changed while it loaded."""
        if key is not None:
            entry.users.add(key)
        with self._lock:
            self._loading.discard(name)
            if self._generation.get(name) != generation:
                return False
            self._entries[name] = entry
            self._measured[name] = entry.nbytes
            counts[name] = counts.get(name, 0) + 1
        return True

    def _discard_stale(self, name: str) -> None:
        self._mover.release()
        logger.info("Context %r changed while it loaded: the old load is thrown away", name)
        self._emit({"action": "evicted", "context": name, "reason": "replaced while loading",
                    "resident": self.resident_bytes()})

    def _loaded(self, name: str, entry: Entry, key: Hashable | None, source: str) -> None:
        logger.info(
            "Loaded context %r on %s from %s in %.2f s (%s)",
            name, entry.device, source, entry.load_seconds, format_bytes(entry.nbytes),
        )
        self._emit(
            {"action": "loaded", "context": name, "key": plain_key(key),
             "seconds": entry.load_seconds, "nbytes": entry.nbytes, "device": entry.device,
             "from": source, "resident": self.resident_bytes(), "host": self.host_bytes()}
        )

    def _failed(self, spec: ContextSpec, exc: BaseException, generation: int) -> None:
        # the finished frames of the failed load hold what it had allocated (a
        # half-built model on the GPU): free it now, not when the failure is forgotten
        traceback.clear_frames(exc.__traceback__)
        self._mover.release()
        # remembered from now on (other threads wait on this context's load lock)
        with self._lock:
            self._loading.discard(spec.name)
            if self._generation.get(spec.name) == generation:
                self._failures[spec.name] = (exc, exc.__traceback__, time.monotonic())
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

        def load() -> Any:
            # torch is set up before the load if something imported it already, and
            # after it if the loader did, before any task uses it
            self._set_torch_threads()
            try:
                return self._mover.place(spec.loader(*args, **kwargs), device)
            finally:
                self._set_torch_threads()

        return self._retry_out_of_memory(spec.name, device, load)

    def _retry_out_of_memory(self, name: str, device: str, attempt: Callable[[], Any]) -> Any:
        """Run ``attempt`` (a load, or a copy back to ``device``); after an out-of-memory
        error evict the idle contexts and run it once more.

        Raises
        ------
        ContextTooLargeError
            If memory runs out with no idle context left to evict.
        """
        retried = False
        while True:
            try:
                return attempt()
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                # the frames of the failed attempt hold what it allocated: free it
                # before evicting, retrying or measuring the free memory
                traceback.clear_frames(exc.__traceback__)
                if retried or not self._evict_unused():
                    raise self._too_large(name, device, exc) from exc
            retried = True
            logger.warning("Out of memory loading %r on %s; evicted idle contexts, retrying",
                           name, device)

    def _too_large(self, name: str, device: str, exc: BaseException) -> ContextTooLargeError:
        self._mover.release()
        memory = self._mover.memory(device)
        free = (
            f"{format_bytes(memory[0])} free of {format_bytes(memory[1])}"
            if memory is not None else "free memory unknown"
        )
        return ContextTooLargeError(
            f"context {name!r} does not fit on {device}: {type(exc).__name__} while loading "
            f"it, with {free} on {device} and {format_bytes(self.used_bytes())} of other "
            "contexts in use on this worker"
        )

    def _set_torch_threads(self) -> None:
        """Give torch its intra-op thread count once something in this process imported it."""
        if self._torch_threads is None or self._torch_threads_set:
            return
        torch = _compat.torch_if_imported()
        if torch is None:
            return
        torch.set_num_threads(self._torch_threads)
        self._torch_threads_set = True
        logger.debug("torch uses %d intra-op threads", self._torch_threads)

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
            # other loads under way take their room too, and cannot be evicted
            loading = {n: b for n, b in self._inflight.items() if n != name and n not in held}
            held.update({n: Resident(b, math.inf) for n, b in loading.items()})
            protected |= loading.keys()
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
        """Evict ``name`` if it is loaded; return whether it was.

        For the reasons in :data:`DEMOTE_REASONS` a context on a GPU goes to the host
        tier, when it fits there; for the others (and on the CPU) it is dropped.
        """
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return False
            demote = reason in DEMOTE_REASONS and self.host_budget > 0
            if demote:
                generation = self._generation.get(name, 0)
                demoting = self._demoting[name] = threading.Event()
        nbytes = entry.nbytes
        start = time.perf_counter()
        tier = None
        if demote:
            try:
                tier = self._demote(name, entry, generation)
            except Exception:
                # a host copy is an optimisation: the eviction itself must go on
                logger.warning("Keeping context %r in host memory failed: it is dropped", name,
                               exc_info=True)
            finally:
                with self._lock:
                    del self._demoting[name]
                demoting.set()
        del entry
        self._mover.release()
        seconds = time.perf_counter() - start
        logger.info("Evicted context %r (%s) to %s: %s",
                    name, format_bytes(nbytes), "host memory" if tier else "nowhere", reason)
        self._emit(
            {"action": "evicted", "context": name, "reason": reason, "seconds": seconds,
             "tier": tier, "resident": self.resident_bytes(), "host": self.host_bytes()}
        )
        return True

    def _demote(self, name: str, entry: Entry, generation: int) -> str | None:
        """Copy ``entry``'s context to the host tier; return "host", or None if it is not kept."""
        with self._lock:
            others = [e.obj for e in self._entries.values()]
        moved = self._mover.find(entry.obj, entry.device, others)
        if moved is None:
            return None
        host_nbytes = self._mover.host_nbytes(moved)
        if not self._reserve_host(host_nbytes):
            logger.info("Context %r (%s in host memory) does not fit in the host budget of %s",
                        name, format_bytes(host_nbytes), format_bytes(int(self.host_budget)))
            return None
        try:
            self._mover.to_host(moved)
        except BaseException:
            with self._lock:
                self._host_reserved -= host_nbytes
            raise
        copy = HostCopy(entry.obj, moved, entry.nbytes, host_nbytes, entry.device, generation,
                        entry.last_used)
        with self._lock:
            self._host_reserved -= host_nbytes
            if self._generation.get(name) != generation:
                return None  # replaced or unregistered while it was copied
            self._host[name] = copy
        return "host"

    def _reserve_host(self, nbytes: int) -> bool:
        """Make room for ``nbytes`` in the host tier, dropping least recently used copies."""
        with self._lock:
            needed = nbytes + self._host_reserved
            if needed > self.host_budget:
                return False
            held = {n: Resident(c.host_nbytes, c.last_used) for n, c in self._host.items()}
            victims = choose_victims(held, needed, self.host_budget)
            dropped = [self._host.pop(v) for v in victims]
            self._host_reserved += nbytes
        if dropped:
            logger.info("Dropped host copies of %s to make room in host memory",
                        ", ".join(repr(v) for v in victims))
            # free their memory before the new copy takes its own
            del dropped
            self._mover.release()
        return True

    def _drop_host_copy(self, name: str, reason: str) -> None:
        with self._lock:
            copy = self._host.pop(name, None)
        if copy is None:
            return
        del copy
        self._mover.release()
        logger.info("Dropped the host copy of context %r: %s", name, reason)

    def clear(self) -> None:
        """Evict everything, host copies included (worker teardown)."""
        for name in list(self._entries):
            self.evict(name, reason="teardown")
        for name in list(self._host):
            self._drop_host_copy(name, reason="teardown")

    # ------------------------------------------------------------------ state
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def resident_bytes(self) -> dict[str, int]:
        """Loaded contexts and their sizes, as sent to the scheduler."""
        with self._lock:
            return {n: e.nbytes for n, e in self._entries.items()}

    def host_bytes(self) -> dict[str, int]:
        """Contexts in the host tier and the host memory each takes."""
        with self._lock:
            return {n: c.host_nbytes for n, c in self._host.items()}

    def loading(self) -> list[str]:
        with self._lock:
            return sorted(self._loading)


def _accepts_device(loader: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(loader).parameters
    except (TypeError, ValueError):
        return False
    return "device" in params


def plain_key(key: Hashable | None) -> Any:
    """Task keys are str or tuples; events must be msgpack-able."""
    return list(key) if isinstance(key, tuple) else key
