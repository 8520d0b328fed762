"""Routing, warm-up, eviction, failure and retirement decisions as pure functions.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.

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
from collections.abc import Collection, Hashable, Mapping, Sequence
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
        Size of the loaded context: measured, else the spec's estimate; ``None``
        when neither is known, which counts as a whole worker's budget.
    allowed
        Workers its tasks may run on: warm, warming, or chosen to warm.
    first
        Priority of its most urgent queued task (lower goes first), used to order
        contexts that compete for the same workers.
    excluded
        Workers that must not serve it now: its load failed there recently, or the
        worker has not set the context up (yet).
    waited
        Seconds since it has had queued work.
    failing
        Its load failed on every worker that tried it lately: it goes only where
        there is room, and no warm context is evicted for it.
    measured
        ``nbytes`` was measured by a load (not only declared in the spec).
    """

    queued: int
    backlog: float
    load_time: float
    nbytes: int | None = None
    allowed: frozenset[str] = frozenset()
    first: tuple = ()
    excluded: frozenset[str] = frozenset()
    waited: float = math.inf
    failing: bool = False
    measured: bool = True

    @property
    def unmeasured(self) -> bool:
        """Its size is a guess: unknown, or declared but never measured."""
        return self.nbytes is None or not self.measured


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
    busy
        Contexts with tasks running on it or sent to it: never evicted there.
    unmeasured
        Contexts never measured (unknown size, or declared only) that it is loading
        or chosen to load: no second one goes there until they are measured.
    """

    budget: float = math.inf
    resident: Mapping[str, Resident] = field(default_factory=dict)
    inflight: int = 0
    busy: frozenset[str] = frozenset()
    unmeasured: frozenset[str] = frozenset()


@dataclass
class Plan:
    """Workers to add to each context's allowed set, and the evictions that implies."""

    add: dict[str, set[str]] = field(default_factory=dict)
    evict: dict[str, list[str]] = field(default_factory=dict)


def plan_routes(
    contexts: Mapping[str, ContextView], workers: Mapping[str, WorkerView], settle: float = 0.0
) -> Plan:
    """Decide which workers start serving which contexts.

    Two passes, both only over workers that are not excluded for the context and
    whose memory budget fits it once contexts that have no work there are evicted.
    A context of unknown size evicts nothing where there is room, and a worker
    takes one such context at a time, until it is measured.
    First, a worker found holding more than its budget (a context was larger than
    its estimate) evicts contexts that have no work there.

    1. A context with queued work and no allowed worker gets one: an idle worker
       if there is one, else the least loaded worker that can hold it *beside* the
       contexts it is busy with. With neither, its tasks wait (they are not lost).
       A context measured (or declared) larger than every worker's budget goes to
       the largest idle worker, emptied for it, which tries it and reports the
       failure if it really does not fit, rather than leaving its tasks waiting.
    2. While a context's backlog per allowed worker exceeds its load time (plus
       the load times of warm contexts the new worker would evict), it is
       widened onto another idle worker (the rule in the module docstring), once
       it has had queued work for ``settle`` seconds: work submitted together
       (several ``client.map`` calls in one notebook cell) is all placed once
       before any of it spreads.

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

    Sizes not known yet count as a whole worker: no two such contexts share one.

    >>> cs = {c: ContextView(queued=5, backlog=5.0, load_time=5.0, first=(i,))
    ...       for i, c in enumerate("ABC")}
    >>> plan_routes(cs, ws).add
    {'A': {'w1'}, 'B': {'w2'}}

    But a context of unknown size evicts nothing where there is room: it goes to
    the worker with the most room, and is measured once loaded.

    >>> roomy = {"w1": WorkerView(budget=100, resident={"A": Resident(30, 0.0)}),
    ...          "w2": WorkerView(budget=100, resident={"B": Resident(90, 0.0)})}
    >>> p = plan_routes({"N": ContextView(queued=5, backlog=5.0, load_time=5.0)}, roomy)
    >>> p.add, p.evict
    ({'N': {'w1'}}, {})

    Once other contexts are measured, an unknown one is guessed at their size: it
    does not squeeze in beside a warm one where only a sliver of room is left.

    >>> tight = {"w1": WorkerView(budget=100, resident={"A": Resident(70, 0.0)}),
    ...          "w2": WorkerView(budget=100, resident={"B": Resident(70, 5.0)})}
    >>> cs = {"A": ContextView(0, 0.0, 5.0, 70, frozenset({"w1"})),
    ...       "B": ContextView(0, 0.0, 5.0, 70, frozenset({"w2"})),
    ...       "N": ContextView(queued=5, backlog=5.0, load_time=5.0)}
    >>> p = plan_routes(cs, tight)
    >>> p.add, p.evict
    ({'N': {'w1'}}, {'w1': ['A']})

    A size only declared is a guess too: a worker loading one unmeasured context
    takes no second one until it is measured.

    >>> loading = {"w1": WorkerView(budget=100, resident={"A": Resident(10, math.inf)},
    ...                             unmeasured=frozenset({"A"}))}
    >>> plan_routes({"B": ContextView(5, 5.0, 5.0, nbytes=10, measured=False)}, loading).add
    {}

    A context whose load failed wherever it was tried evicts nothing either.

    >>> full = {"w1": WorkerView(budget=100, resident={"A": Resident(90, 0.0)})}
    >>> bad = ContextView(queued=5, backlog=5.0, load_time=5.0, nbytes=50, failing=True)
    >>> plan_routes({"F": bad}, full).add
    {}

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

    Work that has just arrived is not spread yet: other work may be on its way.

    >>> fresh = ContextView(queued=100, backlog=30.0, load_time=5.0,
    ...                     allowed=frozenset({"w1"}), waited=0.05)
    >>> plan_routes({"A": fresh}, warm, settle=0.2).add
    {}

    Spreading onto a worker that holds another context must also pay for
    loading that one again later.

    >>> held = {"w1": WorkerView(budget=100, resident={"A": Resident(80, 0.0)}),
    ...         "w2": WorkerView(budget=100, resident={"B": Resident(80, 0.0)})}
    >>> cs = {"A": ContextView(queued=100, backlog=12.0, load_time=5.0, nbytes=80,
    ...                        allowed=frozenset({"w1"})),
    ...       "B": ContextView(queued=0, backlog=0.0, load_time=10.0, nbytes=80,
    ...                        allowed=frozenset({"w2"}))}
    >>> plan_routes(cs, held).add
    {}

    A worker over its budget evicts what it holds with no work to do.

    >>> over = {"w1": WorkerView(budget=100, resident={"A": Resident(80, 0.0),
    ...                                                 "B": Resident(80, 1.0)})}
    >>> plan_routes({"A": ContextView(0, 0.0, 5.0, 80, frozenset({"w1"})),
    ...              "B": ContextView(3, 3.0, 5.0, 80, frozenset({"w1"}))}, over).evict
    {'w1': ['A']}

    A worker whose load failed is not chosen again.

    >>> plan_routes({"A": ContextView(5, 5.0, 5.0, 80, excluded=frozenset({"w1"}))}, ws).add
    {'A': {'w2'}}
    """
    planner = _Planner(contexts, workers)
    for w in sorted(workers):
        planner.trim(w)
    demand = sorted(
        (c for c, v in contexts.items() if v.queued), key=lambda c: (contexts[c].first, c)
    )
    for c in demand:
        if not planner.allowed[c]:
            planner.first_worker(c)
    settled = [c for c in demand if contexts[c].waited >= settle]
    while planner.widen_once(settled):
        pass
    return planner.plan


class _Planner:
    """Mutable bookkeeping for one run of :func:`plan_routes`."""

    def __init__(self, contexts: Mapping[str, ContextView], workers: Mapping[str, WorkerView]):
        self.contexts = contexts
        self.workers = workers
        self.allowed = {
            c: {w for w in v.allowed if w in workers and w not in v.excluded}
            for c, v in contexts.items()
        }
        # worker -> contexts with queued work it may serve, kept as allowed changes
        self.serving: dict[str, set[str]] = {w: set() for w in workers}
        for c, v in contexts.items():
            if v.queued:
                for w in self.allowed[c]:
                    self.serving[w].add(c)
        self.resident = {w: dict(v.resident) for w, v in workers.items()}
        self.unmeasured = {w: set(v.unmeasured) for w, v in workers.items()}
        self.typical: int | None = None
        self.plan = Plan()

    def serves(self, w: str) -> set[str]:
        """Contexts with queued work that ``w`` is allowed to serve."""
        return self.serving[w]

    def disallow(self, c: str, w: str) -> None:
        self.allowed.get(c, set()).discard(w)
        self.serving[w].discard(c)

    def spare(self, w: str) -> bool:
        return not self.workers[w].inflight and not self.serves(w)

    def load(self, w: str) -> float:
        share = sum(
            self.contexts[c].queued / len(self.allowed[c]) for c in self.serves(w)
        )
        return self.workers[w].inflight + share

    def victims(self, w: str, c: str) -> list[str] | None:
        """Contexts ``w`` must evict to hold ``c``; None if it cannot hold it.

        A context of unknown size is guessed to be as large as the contexts measured
        so far (the mean; with none, it needs only some room), on a worker not
        loading another one, and is measured once loaded; contexts being loaded or
        about to be are never evicted.
        """
        held = self.resident[w]
        if c in held:
            return []
        view = self.contexts[c]
        budget = self.workers[w].budget
        if view.unmeasured and self.unmeasured[w] and not math.isinf(budget):
            return None
        need = self.guess(c)
        protected = {*self.serves(w), *self.workers[w].busy,
                     *(n for n, r in held.items() if math.isinf(r.last_used))}
        try:
            out = choose_victims(held, need, budget, protected=protected)
        except ContextTooLargeError:
            return None
        if out and view.failing:
            return None
        left = sum(r.nbytes for n, r in held.items() if n not in out)
        return out if left + need <= budget else None

    def guess(self, c: str) -> int:
        """Bytes ``c`` is planned to take: measured or declared, else the mean of the
        contexts whose size is known, else 1 (some room)."""
        nbytes = self.contexts[c].nbytes
        if nbytes is not None:
            return nbytes
        if self.typical is None:
            known = [v.nbytes for v in self.contexts.values() if v.nbytes is not None]
            self.typical = int(sum(known) / len(known)) if known else 1
        return self.typical

    def room(self, w: str) -> float:
        return self.workers[w].budget - sum(r.nbytes for r in self.resident[w].values())

    def add(self, c: str, w: str, victims: list[str]) -> None:
        self.allowed[c].add(w)
        if self.contexts[c].queued:
            self.serving[w].add(c)
        self.plan.add.setdefault(c, set()).add(w)
        for v in victims:
            del self.resident[w][v]
            self.disallow(v, w)
            self.plan.evict.setdefault(w, []).append(v)
        self.resident[w][c] = Resident(self.guess(c), math.inf)
        if self.contexts[c].unmeasured:
            self.unmeasured[w].add(c)

    def trim(self, w: str) -> None:
        """A worker holding more than its budget (a context was larger than its
        estimate) evicts what has no work there, least recently used first."""
        held = self.resident[w]
        budget = self.workers[w].budget
        if sum(r.nbytes for r in held.values()) <= budget:
            return
        protected = {*self.serves(w), *self.workers[w].busy}
        victims = choose_victims(held, 0, budget, protected)
        for v in victims:
            del self.resident[w][v]
            self.disallow(v, w)
            self.plan.evict.setdefault(w, []).append(v)

    def eligible(self, c: str) -> list[str]:
        return [w for w in sorted(self.workers) if w not in self.contexts[c].excluded]

    def first_worker(self, c: str) -> None:
        eligible = self.eligible(c)
        if not eligible:
            return
        nbytes = self.contexts[c].nbytes
        if nbytes is not None and nbytes > max(self.workers[w].budget for w in eligible):
            # larger than every budget as far as anyone knows: the largest idle
            # worker tries it (the estimate may be wrong; if it is not, its failure
            # fails the tasks with ContextTooLargeError once every worker tried)
            spare = [w for w in eligible if self.spare(w)]
            if spare:
                w = max(spare, key=lambda w: self.workers[w].budget)
                self.add(c, w, [n for n in self.resident[w] if n not in self.workers[w].busy])
            return
        best = None
        for w in eligible:
            victims = self.victims(w, c)
            if victims is None:
                continue
            rank = (not self.spare(w), len(victims), self.load(w), -self.room(w))
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
                for w in self.eligible(c)
                if w not in self.allowed[c]
                and self.spare(w)
                and (v := self.victims(w, c)) is not None
                # a warm context evicted to make room will cost its own load when
                # it is needed again: spreading onto its worker must pay for both
                and per_worker(c) > self.contexts[c].load_time + self.reload_cost(v)
            ]
            if options:
                _, w, victims = min(options)
                self.add(c, w, victims)
                return True
        return False

    def reload_cost(self, victims: list[str]) -> float:
        return sum(self.contexts[v].load_time for v in victims if v in self.contexts)


def fit_resources(
    fitting: Sequence[frozenset[str] | None], allowed: frozenset[str], workers: frozenset[str]
) -> tuple[frozenset[str], frozenset[str]]:
    """What :func:`plan_routes` must see of a context whose queued tasks ask for
    resources (``resources=``): the workers allowed to serve it, and those excluded.

    ``fitting`` has an entry per distinct request among its queued tasks: the
    workers that have those resources, or None for tasks that ask for none.
    Without this, a plan could warm workers none of the tasks can run on.

    While some request fits none of the allowed workers, the plan sees no allowed
    worker and only the workers that fit that request (the first such), so that
    its first pass gives the request a worker; the next plan serves the next.
    Otherwise the workers that fit no queued task are excluded: widening adds only
    workers that can run them.

    Examples
    --------
    Tasks that ask for a GPU, the context warm on a CPU worker only: the plan must
    give it a GPU worker.

    >>> gpus, cluster = frozenset({"g1", "g2"}), frozenset({"c1", "g1", "g2"})
    >>> def fit(fitting, allowed):
    ...     return tuple(sorted(s) for s in fit_resources(fitting, frozenset(allowed), cluster))
    >>> fit([gpus], {"c1"})
    ([], ['c1'])

    Served by a GPU worker: the CPU worker stays out of the plan.

    >>> fit([gpus], {"g1"})
    (['g1'], ['c1'])

    Tasks that ask for nothing beside them: any worker may serve those, once the
    GPU tasks have a worker.

    >>> fit([gpus, None], {"c1"})
    ([], ['c1'])
    >>> fit([gpus, None], {"c1", "g2"})
    (['c1', 'g2'], [])

    Resources no worker has: those tasks wait for a worker that has them, as Dask's
    own tasks do, and hold back no other task; with no other task, no worker is
    planned.

    >>> fit([frozenset(), None], {"c1"})
    (['c1'], [])
    >>> fit([frozenset()], set())
    ([], ['c1', 'g1', 'g2'])
    """
    servable = [fit for fit in fitting if fit is None or fit]
    if not servable:
        return frozenset(), workers
    for fit in servable:
        if fit is not None and not fit & allowed:
            return frozenset(), workers - fit
    if None in servable:
        return allowed, frozenset()
    return allowed, workers - frozenset().union(*servable)


def load_failed_everywhere(
    failed: Collection[str], running: Collection[str], serving: bool, limit: int
) -> bool:
    """Whether a context's tasks should fail because its load keeps failing.

    A failed load only takes that worker out of the context's workers (for
    ``failed-load-retry``); the tasks go to healthy workers. They fail when no
    worker holds or is loading the context (``serving`` is false) and either every
    running worker has failed to load it, or ``limit`` distinct workers have.

    Parameters
    ----------
    failed
        Workers whose load of the context failed recently, including departed ones.
    running
        Workers running now.
    serving
        Whether some worker holds the context or is loading it.
    limit
        ``dask-context.scheduler.failed-load-workers``.

    Examples
    --------
    One bad node of three: the tasks go elsewhere.

    >>> load_failed_everywhere({"a"}, {"a", "b", "c"}, serving=False, limit=3)
    False

    Every worker failed, or as many as the limit: the tasks fail.

    >>> load_failed_everywhere({"a", "b"}, {"a", "b"}, serving=False, limit=3)
    True
    >>> load_failed_everywhere({"a", "b", "c"}, {"a", "b", "c", "d"}, serving=False, limit=3)
    True

    The context is warm somewhere: nothing fails.

    >>> load_failed_everywhere({"a", "b"}, {"a", "b", "c"}, serving=True, limit=2)
    False
    """
    if serving or not failed:
        return False
    failed = set(failed)
    return (bool(running) and set(running) <= failed) or len(failed) >= limit


@dataclass(frozen=True)
class RetireView:
    """What scale-in needs to know of a worker.

    Attributes
    ----------
    warm
        Contexts it holds.
    idle_for
        Seconds since it last ran a context task (``math.inf`` if never).
    group
        Workers with the same group (one batch job) are retired together or not at
        all; ``None`` for a worker of its own.
    """

    warm: frozenset[str] = frozenset()
    idle_for: float = math.inf
    group: Hashable | None = None


def hold_back(
    workers: Mapping[str, RetireView], wanted: Collection[str], keep_warm: float
) -> set[str]:
    """Workers that scale-in must keep: warm ones worth keeping, with their groups.

    A warm worker is worth keeping while one of its contexts has work (queued or
    running: ``wanted``), or for ``keep_warm`` seconds after it last ran a context
    task. Busy or cold workers are never held back here: whether they may go is
    Dask's own decision. A held-back worker keeps every worker of its group.

    Examples
    --------
    >>> ws = {"cold": RetireView(),
    ...       "warm-A": RetireView(warm=frozenset({"A"}), idle_for=500),
    ...       "warm-B": RetireView(warm=frozenset({"B"}), idle_for=500),
    ...       "fresh": RetireView(warm=frozenset({"C"}), idle_for=1)}
    >>> sorted(hold_back(ws, wanted={"B"}, keep_warm=60))
    ['fresh', 'warm-B']

    Workers of one batch job stay together.

    >>> job = {"w0": RetireView(warm=frozenset({"A"}), idle_for=1, group="job-7"),
    ...        "w1": RetireView(group="job-7"), "w2": RetireView(group="job-8")}
    >>> sorted(hold_back(job, wanted=(), keep_warm=60))
    ['w0', 'w1']
    """
    wanted = set(wanted)
    held = {
        w
        for w, v in workers.items()
        if v.warm and (v.warm & wanted or v.idle_for < keep_warm)
    }
    groups = {workers[w].group for w in held} - {None}
    held |= {w for w, v in workers.items() if v.group in groups}
    return held


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
