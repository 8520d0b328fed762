"""Routing, warm-up, eviction and retirement decisions as pure functions.

Nothing here touches Dask: each function takes plain data (the views below) and
returns a decision, so that every rule can be read, doctested and unit tested on its
own. The plugins in :mod:`dask_context.worker` and :mod:`dask_context.scheduler`
gather the data and carry the decisions out.

The central rule is the one from the papers' cost model. A context with ``W`` seconds
of queued work served by ``k`` workers finishes in ``W / k``. Warming one more worker
costs it a load of ``L`` seconds before it helps, after which the work finishes in
``(W + L) / (k + 1)``. That is sooner exactly when ``W / k > L``: a cold worker is
worth warming only while the backlog per warm worker is longer than a load.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from dask_context.errors import ContextTooLargeError


@dataclass(frozen=True)
class Resident:
    """A context held by a worker: its size and when a task last used it."""

    nbytes: int
    last_used: float


def resolve_device(requested: str, gpu_free: Sequence[int]) -> str:
    """Pick the device a context is pinned to.

    Parameters
    ----------
    requested
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    gpu_free
        Free bytes of each GPU visible to the worker (empty without GPUs).

    Examples
    --------
    >>> resolve_device("auto", [])
    'cpu'
    >>> resolve_device("auto", [2_000, 9_000])   # the GPU with most free memory
    'cuda:1'
    >>> resolve_device("cuda", [5])
    'cuda:0'
    >>> resolve_device("cuda:1", [5])
    Traceback (most recent call last):
    ...
    ValueError: device 'cuda:1' requested but this worker sees 1 GPU(s)
    """
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        if not gpu_free:
            return "cpu"
        return f"cuda:{max(range(len(gpu_free)), key=lambda i: (gpu_free[i], -i))}"
    index = 0 if requested == "cuda" else int(requested.split(":")[1])
    if index >= len(gpu_free):
        raise ValueError(
            f"device {requested!r} requested but this worker sees {len(gpu_free)} GPU(s)"
        )
    return f"cuda:{index}"


def choose_victims(
    resident: Mapping[str, Resident],
    needed: int,
    budget: float,
    protected: Collection[str] = (),
) -> list[str]:
    """Least recently used contexts to evict so that ``needed`` more bytes fit.

    Contexts in ``protected`` (in use, or with work waiting for them here) are never
    chosen. When even evicting every other context leaves too little room, all of them
    are returned; the caller compares the result with the budget.

    Raises
    ------
    ContextTooLargeError
        If ``needed`` alone exceeds ``budget``.

    Examples
    --------
    >>> held = {"a": Resident(40, last_used=1.0), "b": Resident(40, last_used=5.0)}
    >>> choose_victims(held, needed=30, budget=100)
    ['a']
    >>> choose_victims(held, needed=30, budget=120)
    []
    >>> choose_victims(held, needed=30, budget=100, protected={"a"})
    ['b']
    >>> choose_victims(held, needed=200, budget=100)
    Traceback (most recent call last):
    ...
    dask_context.errors.ContextTooLargeError: a context of 200 B does not fit in a memory budget of 100 B
    """
    if needed > budget:
        from dask.utils import format_bytes

        raise ContextTooLargeError(
            f"a context of {format_bytes(needed)} does not fit in a memory budget "
            f"of {format_bytes(int(budget))}"
        )
    free = budget - sum(r.nbytes for r in resident.values())
    victims = []
    for name in sorted(resident, key=lambda n: (resident[n].last_used, n)):
        if free >= needed:
            break
        if name not in protected:
            victims.append(name)
            free += resident[name].nbytes
    return victims


@dataclass(frozen=True)
class ContextView:
    """The scheduler's view of one context.

    Attributes
    ----------
    queued
        Tasks waiting for a worker.
    backlog
        Estimated seconds of work in those tasks.
    load_time
        Estimated seconds to load the context on a cold worker.
    nbytes
        Estimated size of the loaded context.
    allowed
        Workers its tasks may run on: warm, warming, or chosen to warm.
    first
        Priority of its most urgent queued task (lower goes first), used to order
        contexts that compete for the same workers.
    """

    queued: int
    backlog: float
    load_time: float
    nbytes: int = 0
    allowed: frozenset[str] = frozenset()
    first: tuple = ()


@dataclass(frozen=True)
class WorkerView:
    """The scheduler's view of one running worker.

    Attributes
    ----------
    budget
        Bytes of contexts it may hold (``math.inf`` when unknown).
    resident
        Contexts it holds, or is loading.
    inflight
        Tasks it is running or has been sent.
    """

    budget: float = math.inf
    resident: Mapping[str, Resident] = field(default_factory=dict)
    inflight: int = 0


@dataclass
class Plan:
    """Workers to add to each context's allowed set, and the evictions that implies."""

    add: dict[str, set[str]] = field(default_factory=dict)
    evict: dict[str, list[str]] = field(default_factory=dict)


def plan_routes(
    contexts: Mapping[str, ContextView], workers: Mapping[str, WorkerView]
) -> Plan:
    """Decide which workers start serving which contexts.

    Two passes, both only over workers whose memory budget fits the context once
    contexts that have no queued work are evicted:

    1. A context with queued work and no allowed worker gets one: an idle worker
       if there is one, else the least loaded worker that can hold it *beside* the
       contexts it is busy with. With neither, its tasks wait (they are not lost).
       A context larger than every worker's budget goes to the largest worker,
       where loading it fails its tasks with a clear error rather than a hang.
    2. While a context's backlog per allowed worker exceeds its load time, it is
       widened onto another idle worker (the rule in the module docstring).

    Examples
    --------
    Two workers, a budget that fits one model each, two contexts with work:
    each context gets its own worker instead of both loading on both.

    >>> ws = {"w1": WorkerView(budget=100), "w2": WorkerView(budget=100)}
    >>> cs = {"A": ContextView(queued=50, backlog=50.0, load_time=5.0, nbytes=80),
    ...       "B": ContextView(queued=50, backlog=50.0, load_time=5.0, nbytes=80,
    ...                        first=(1,))}
    >>> plan_routes(cs, ws).add
    {'A': {'w1'}, 'B': {'w2'}}

    A short backlog stays on its warm worker; a long one is worth a second load.

    >>> warm = {"w1": WorkerView(resident={"A": Resident(80, 0.0)}), "w2": WorkerView()}
    >>> short = ContextView(queued=10, backlog=3.0, load_time=5.0,
    ...                     allowed=frozenset({"w1"}))
    >>> plan_routes({"A": short}, warm).add
    {}
    >>> long = ContextView(queued=100, backlog=30.0, load_time=5.0,
    ...                    allowed=frozenset({"w1"}))
    >>> plan_routes({"A": long}, warm).add
    {'A': {'w2'}}

    A third context waits while both workers are busy with contexts that fill them.

    >>> busy = {"w1": WorkerView(budget=100, resident={"A": Resident(80, 0.0)}),
    ...         "w2": WorkerView(budget=100, resident={"B": Resident(80, 0.0)})}
    >>> cs = {"A": ContextView(5, 5.0, 5.0, 80, frozenset({"w1"})),
    ...       "B": ContextView(5, 5.0, 5.0, 80, frozenset({"w2"})),
    ...       "C": ContextView(5, 5.0, 5.0, 80)}
    >>> plan_routes(cs, busy).add
    {}
    """
    planner = _Planner(contexts, workers)
    demand = sorted(
        (c for c, v in contexts.items() if v.queued), key=lambda c: (contexts[c].first, c)
    )
    for c in demand:
        if not planner.allowed[c]:
            planner.first_worker(c)
    while planner.widen_once(demand):
        pass
    return planner.plan


class _Planner:
    """Mutable bookkeeping for one run of :func:`plan_routes`."""

    def __init__(self, contexts: Mapping[str, ContextView], workers: Mapping[str, WorkerView]):
        self.contexts = contexts
        self.workers = workers
        self.allowed = {c: set(v.allowed) & workers.keys() for c, v in contexts.items()}
        self.resident = {w: dict(v.resident) for w, v in workers.items()}
        self.plan = Plan()

    def serves(self, w: str) -> list[str]:
        """Contexts with queued work that ``w`` is allowed to serve."""
        return [c for c, v in self.contexts.items() if v.queued and w in self.allowed[c]]

    def spare(self, w: str) -> bool:
        return not self.workers[w].inflight and not self.serves(w)

    def load(self, w: str) -> float:
        share = sum(
            self.contexts[c].queued / len(self.allowed[c]) for c in self.serves(w)
        )
        return self.workers[w].inflight + share

    def victims(self, w: str, c: str) -> list[str] | None:
        """Contexts ``w`` must evict to hold ``c``; None if it cannot hold it."""
        held = self.resident[w]
        if c in held:
            return []
        need = self.contexts[c].nbytes
        budget = self.workers[w].budget
        try:
            out = choose_victims(held, need, budget, protected=self.serves(w))
        except ContextTooLargeError:
            return None
        left = sum(r.nbytes for n, r in held.items() if n not in out)
        return out if left + need <= budget else None

    def add(self, c: str, w: str, victims: list[str]) -> None:
        self.allowed[c].add(w)
        self.plan.add.setdefault(c, set()).add(w)
        for v in victims:
            del self.resident[w][v]
            self.allowed.get(v, set()).discard(w)
            self.plan.evict.setdefault(w, []).append(v)
        self.resident[w][c] = Resident(self.contexts[c].nbytes, math.inf)

    def first_worker(self, c: str) -> None:
        if self.workers and self.contexts[c].nbytes > max(v.budget for v in self.workers.values()):
            # no worker can ever hold it: send it to the largest one anyway, whose
            # load fails the tasks with ContextTooLargeError instead of leaving them
            # waiting forever
            w = max(sorted(self.workers), key=lambda w: self.workers[w].budget)
            self.allowed[c].add(w)
            self.plan.add.setdefault(c, set()).add(w)
            return
        best = None
        for w in sorted(self.workers):
            victims = self.victims(w, c)
            if victims is None:
                continue
            rank = (not self.spare(w), self.load(w), len(victims))
            if best is None or rank < best[0]:
                best = (rank, w, victims)
        if best is not None:
            self.add(c, best[1], best[2])

    def widen_once(self, demand: list[str]) -> bool:
        def per_worker(c: str) -> float:
            return self.contexts[c].backlog / len(self.allowed[c])

        wanting = [
            c
            for c in demand
            if self.allowed[c] and per_worker(c) > self.contexts[c].load_time
        ]
        for c in sorted(wanting, key=lambda c: (-per_worker(c), c)):
            options = [
                (len(v), w, v)
                for w in sorted(self.workers)
                if w not in self.allowed[c]
                and self.spare(w)
                and (v := self.victims(w, c)) is not None
            ]
            if options:
                _, w, victims = min(options)
                self.add(c, w, victims)
                return True
        return False


@dataclass(frozen=True)
class RetireView:
    """What scale-in needs to know of a worker.

    Attributes
    ----------
    idle
        It runs no task and has none queued.
    warm
        Contexts it holds.
    idle_for
        Seconds since it last ran a task.
    nbytes
        Bytes of results it holds (they must move before it goes).
    """

    idle: bool
    warm: frozenset[str] = frozenset()
    idle_for: float = math.inf
    nbytes: int = 0


def retire_order(
    workers: Mapping[str, RetireView], wanted: Collection[str], keep_warm: float
) -> list[str]:
    """Workers that may be retired, the best candidates first.

    Only idle workers may go. A worker warm for a context in ``wanted`` (one with
    work left) stays, as does a warm worker idle for less than ``keep_warm``
    seconds. Cold workers go first, then those warm for fewer contexts, then those
    holding fewer bytes of results.

    Examples
    --------
    >>> ws = {"cold": RetireView(idle=True),
    ...       "warm-A": RetireView(idle=True, warm=frozenset({"A"}), idle_for=500),
    ...       "warm-B": RetireView(idle=True, warm=frozenset({"B"}), idle_for=500),
    ...       "fresh": RetireView(idle=True, warm=frozenset({"C"}), idle_for=1),
    ...       "busy": RetireView(idle=False)}
    >>> retire_order(ws, wanted={"B"}, keep_warm=60)
    ['cold', 'warm-A']
    """
    ok = [
        w
        for w, v in workers.items()
        if v.idle
        and not (v.warm & set(wanted))
        and not (v.warm and v.idle_for < keep_warm)
    ]
    return sorted(ok, key=lambda w: (len(workers[w].warm), workers[w].nbytes, w))


def workers_wanted(
    contexts: Mapping[str, ContextView], startup: float, target_duration: float
) -> int:
    """How many workers the queued context work can use profitably.

    A new worker first waits ``startup`` seconds for the batch system and then
    ``load_time`` for the context, so each context asks for at most
    ``ceil(backlog / max(startup + load_time, target_duration))`` workers (at least
    one while it has work, never more than its queued tasks), and never fewer than
    the workers it already uses.

    Examples
    --------
    >>> cs = {"A": ContextView(queued=1000, backlog=600.0, load_time=20.0),
    ...       "B": ContextView(queued=3, backlog=1.5, load_time=20.0)}
    >>> workers_wanted(cs, startup=10.0, target_duration=5.0)
    21
    >>> workers_wanted({}, startup=10.0, target_duration=5.0)
    0
    """
    total = 0
    for v in contexts.values():
        if not v.queued:
            continue
        horizon = max(startup + v.load_time, target_duration, 1e-9)
        k = max(1, min(v.queued, math.ceil(v.backlog / horizon)))
        total += max(k, len(v.allowed))
    return total
