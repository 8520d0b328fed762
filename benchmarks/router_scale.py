"""Router cost against cluster size: a real Scheduler, the real router, simulated workers.

    python -m benchmarks.router_scale                          # 16 .. 1024 workers, 1 and 100 contexts
    python -m benchmarks.router_scale --workers 16 256 --contexts 1 --tasks 5000 --json

Each simulated worker is a few lines of asyncio that speak distributed's worker
protocol over in-process comms (``inproc://``): it registers with the scheduler like
a ``Worker`` does, announces the contexts it holds warm to the router (a
``dask_context_worker`` call with a snapshot, as ``WorkerContexts`` makes one), and
answers every ``compute-task`` with ``task-finished`` at once. So the scheduler runs
its whole transition engine and every hook of the router, and nothing else: no task
code, no data transfer (results are never gathered), no event loop of a thousand
real workers. Workers hold one context each, round-robin (several when contexts outnumber
workers).

Per size it runs the same tasks on a fresh cluster, marked with ``use()`` (the
router places them) and unmarked with no router at all (plain Dask), alternated and
repeated (``--repeat``, the table shows medians), and reports the time spent
inside the router's methods per task (measured by wrapping the methods through
which the scheduler enters it: every hook, handler and callback; the counting pass
checks that it is entered through no other), the same without the scheduler's own
transitions that placing a task runs (plain Dask runs those too, in its own
placement), and the wall time against plain Dask.

Timers vary with the machine's speed (twice over on a shared VM). So each size also
gets one more routed run, apart from the timed ones (``--count``, on by default),
that counts the Python and C function calls made inside the router's methods
(:class:`CallCounter`): the router's work per task, whatever the machine. They are
kept in shares: the scheduler's transitions that placing a task runs (as timed
apart, less the router's hook that they call), planning (``_replan``: amortized, at
most a share of the scheduler's time) and the routing tick's housekeeping
(``_periodic``: it runs by the clock, not per event); the rest is the router's work
per scheduler event, which should not grow with the workers or the contexts.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import dask
from distributed import Client, Scheduler
from distributed.comm import connect
from distributed.comm.inproc import global_manager
from distributed.diagnostics.plugin import SchedulerPlugin

import dask_context
from dask_context import _compat
from dask_context.scheduler import ContextRouter

SEND = "scheduler transitions placing routed tasks"
GC = "garbage collection pauses inside the router"
# the shares of the calls counted inside the router (CallCounter), besides SEND
PLAN = "planning: ContextRouter._replan and what it calls"
TICK = "the routing tick's own housekeeping: ContextRouter._periodic outside _run"
EVENT = "the router's work per scheduler event"

NTHREADS = 1
# what a worker's get_metrics() sends, at rest
METRICS = {
    "task_counts": {}, "bandwidth": {"total": 1e8, "workers": {}, "types": {}},
    "digests_total_since_heartbeat": {}, "managed_bytes": 0,
    "spilled_bytes": {"memory": 0, "disk": 0},
    "transfer": {"incoming_bytes": 0, "incoming_count": 0, "incoming_count_total": 0,
                 "outgoing_bytes": 0, "outgoing_count": 0, "outgoing_count_total": 0},
    "event_loop_interval": 0.02, "memory": 10**8, "cpu": 0.0, "time": 0.0,
}


class SimulatedWorker:
    """A worker that runs every task it is sent in no time, over an inproc comm.

    With ``hold``, it keeps the tasks it is sent (``held``) until :meth:`finish` is
    called: tests deliver one event at a time that way.
    """

    def __init__(self, scheduler: str, address: str, contexts: list[str], tokens: dict[str, str],
                 hold: bool = False):
        self.scheduler = scheduler
        self.address = address
        self.contexts = contexts
        self.tokens = tokens
        self.hold = hold
        self.held: list[dict[str, Any]] = []
        self.comm: Any = None
        self.reader: asyncio.Task | None = None

    async def start(self) -> None:
        self.comm = await connect(self.scheduler)
        await self.comm.write({
            "op": "register-worker", "reply": False, "address": self.address,
            "status": "running", "nthreads": NTHREADS, "name": self.address,
            "now": time.time(), "resources": {}, "memory_limit": 2**34,
            "local_directory": "/tmp", "services": {}, "nanny": None, "pid": 0,
            "versions": {}, "metrics": METRICS, "extra": {}, "server_id": self.address,
            "stimulus_id": f"simulated-{time.time()}",
        })
        response = await self.comm.read()
        assert response["status"] == "OK", response
        self.reader = asyncio.create_task(self._serve())

    async def announce(self, rpc: Any) -> None:
        snapshot = {
            "seq": 1, "budget": float("inf"), "device": "cpu", "job": None,
            "specs": {c: {"name": c, "token": self.tokens[c]} for c in self.tokens},
            "resident": {c: 1000 for c in self.contexts}, "loading": [], "host": {},
        }
        await rpc.dask_context_worker(worker=self.address, **snapshot)

    async def _serve(self) -> None:
        while True:
            msgs = await self.comm.read()
            replies = []
            for msg in msgs if isinstance(msgs, list) else [msgs]:
                if msg.get("op") == "compute-task":
                    if self.hold:
                        self.held.append(msg)
                    else:
                        replies.append(self._finished(msg))
                elif msg.get("op") == "close":
                    return
            if replies:
                await self.comm.write(replies)

    async def finish(self, n: int = 1) -> None:
        """Report the first ``n`` held tasks finished."""
        done, self.held = self.held[:n], self.held[n:]
        await self.comm.write([self._finished(msg) for msg in done])

    @staticmethod
    def _finished(msg: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        return {
            "op": "task-finished", "key": msg["key"], "run_id": msg["run_id"],
            "status": "OK", "nbytes": 28, "type": None, "typename": "int",
            "metadata": {}, "thread": 0,
            "startstops": [{"action": "compute", "start": now, "stop": now}],
            "stimulus_id": f"simulated-finished-{now}",
        }

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.comm is not None:
            await self.comm.close()


class GCPauses:
    """Seconds the interpreter spent in garbage collection, by generation, while
    active. A full collection walks the whole heap (here the scheduler's and the
    simulated workers' objects together): it is timed apart, wherever it struck,
    because which allocation happens to trigger it says nothing of who made the
    heap big."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.by_generation = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self._start = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        spent = time.perf_counter() - self._start
        self.seconds += spent
        self.by_generation[info["generation"]] += spent
        self.counts[info["generation"]] += 1


class CallCounter:
    """Function calls (Python ``call`` and C ``c_call`` profiling events) made while
    active, by share: a deterministic measure of work, where timers vary with the
    machine.

    ``shares`` names the functions whose calls, and the calls they make, are
    counted under another share than ``default``; the innermost such function on
    the stack decides (a share of ``None`` is not counted at all). Calls of the
    functions in ``unseen`` (the instrumentation's own wrappers) are not counted,
    and leave the share as it is. :meth:`profile` is the hook: :func:`instrument`
    sets it only while inside the router, since a profiling hook slows every call
    it sees.

    >>> def inner(): return len("ab")
    >>> def outer(): return inner() + abs(-1)
    >>> counter = CallCounter({inner.__code__: "inner"}, default="outer")
    >>> sys.setprofile(counter.profile); outer(); sys.setprofile(None)
    3
    >>> dict(counter.counts)
    {'outer': 2, 'inner': 2}
    """

    def __init__(self, shares: dict[CodeType, str | None], default: str) -> None:
        self.shares = shares
        self.default = default
        self.counts: dict[str, int] = defaultdict(int)
        self.unseen: set[CodeType] = set()
        # the frames of the functions in shares that have not returned, innermost last
        self._stack: list[tuple[FrameType, str | None]] = []

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            if frame.f_code in self.unseen:
                return
            if frame.f_code in self.shares:
                self._stack.append((frame, self.shares[frame.f_code]))
        elif event == "return":
            # also when an exception unwinds the frame
            if self._stack and self._stack[-1][0] is frame:
                self._stack.pop()
            return
        elif event != "c_call" or arg is sys.setprofile:
            # c_return, c_exception; and the call that ends the counting, made by
            # the instrumentation rather than the router
            return
        share = self._stack[-1][1] if self._stack else self.default
        if share is not None:
            self.counts[share] += 1

    def clear(self) -> None:
        self.counts.clear()


def entry_points(scheduler: Scheduler, router: ContextRouter) -> dict[Any, set[str]]:
    """The methods through which the scheduler and its event loop enter the router (and
    its scaling helper): its ``SchedulerPlugin`` hooks, the handlers it registered, and
    the routing loop's callbacks. Timing these alone times all the router's work: what
    it calls from them runs inside. The counting pass checks that nothing else is
    entered (:func:`instrument`)."""
    hooks = {n for n in dir(SchedulerPlugin) if not n.startswith("_")}
    entries: dict[Any, set[str]] = {router: hooks | {"_run", "_periodic", "wake"},
                                    router.scaling: set()}
    for handler in (*scheduler.handlers.values(), *scheduler.stream_handlers.values()):
        owner = getattr(handler, "__self__", None)
        if owner in entries:
            entries[owner].add(handler.__name__)
    return entries


def instrument(router: ContextRouter, pauses: GCPauses, entries: dict[Any, set[str]],
               counter: CallCounter | None = None) -> tuple[dict[str, float], set[str]]:
    """Time the router's methods: its ``entries`` (:func:`entry_points`); the garbage
    collections that strike inside are counted apart (``GC``).

    With ``counter``, every method is wrapped instead, and the counter's profiling hook
    is set while inside the router. Returns the seconds spent, by method, and (with
    ``counter``) the methods that were entered from outside the router: those must be
    among ``entries``, or the timed runs would miss the router's work.

    Only the entries are wrapped in the timed runs because a wrapper costs a call
    (half a microsecond here) each time the router calls through it: a dozen times a
    task if every method were wrapped, time that is the benchmark's, not the router's.
    """
    spent: dict[str, float] = defaultdict(float)
    entered: set[str] = set()
    depth = [0]

    def timed(fn: Any, name: str) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            start, paused = time.perf_counter(), pauses.seconds
            if counter is not None:
                entered.add(name)
                sys.setprofile(counter.profile)
            try:
                return fn(*args, **kwargs)
            finally:
                if counter is not None:
                    sys.setprofile(None)
                collected = pauses.seconds - paused
                spent[name] += time.perf_counter() - start - collected
                spent[GC] += collected
                depth[0] -= 1
        if counter is not None:
            # the router calls its methods through these wrappers too: those
            # calls are the benchmark's, not the router's
            counter.unseen.add(wrapper.__code__)
        return wrapper

    # placing a task runs the scheduler's own transitions (as plain Dask's placement
    # does): timed apart, so that the router's own work can be told from Dask's
    send = _compat.send

    def timed_send(*args: Any, **kwargs: Any) -> Any:
        start, paused = time.perf_counter(), pauses.seconds
        try:
            return send(*args, **kwargs)
        finally:
            spent[SEND] += time.perf_counter() - start - (pauses.seconds - paused)

    _compat.send = timed_send
    for obj, names in entries.items():
        for name in dir(type(obj)) if counter is not None else names:
            fn = getattr(obj, name, None)
            if name.startswith("__") or not callable(fn) or asyncio.iscoroutinefunction(fn):
                continue
            setattr(obj, name, timed(fn, f"{type(obj).__name__}.{name}"))
    return spent, entered


def time_placements(scheduler: Scheduler, pauses: GCPauses) -> list[float]:
    """Time the scheduler's transitions of tasks to ``processing``: Dask's placement
    of a task on a worker, which both arms run (plain Dask from ``queued``, the router
    from ``no-worker``). Returns the list the seconds of each are appended to,
    garbage collections left out."""
    placing: list[float] = []
    transition = scheduler._transition

    def timed(key: Any, finish: str, stimulus_id: str, **kwargs: Any) -> Any:
        if finish != "processing":
            return transition(key, finish, stimulus_id, **kwargs)
        start, paused = time.perf_counter(), pauses.seconds
        try:
            return transition(key, finish, stimulus_id, **kwargs)
        finally:
            placing.append(time.perf_counter() - start - (pauses.seconds - paused))

    scheduler._transition = timed
    return placing


def holdings(nworkers: int, names: list[str]) -> list[list[str]]:
    """Contexts each worker holds warm: one each, round-robin, and every context
    held somewhere (several per worker when contexts outnumber workers).

    >>> holdings(2, ["a", "b", "c"]), holdings(3, ["a"])
    ([['a', 'c'], ['b']], [['a'], ['a'], ['a']])
    """
    if len(names) <= nworkers:
        return [[names[i % len(names)]] for i in range(nworkers)]
    return [names[i::nworkers] for i in range(nworkers)]


def _touch(x: int, context: str) -> int:
    return x


send_untimed = _compat.send


def call_counter() -> CallCounter:
    """A counter of the calls inside the router, in the shares of ``calls_per_task``."""
    return CallCounter({
        send_untimed.__code__: SEND,
        # the router's hook that those transitions call is the router's own work
        # (the SEND timing includes it: a timer cannot leave it out cheaply)
        ContextRouter.transition.__code__: EVENT,
        ContextRouter._replan.__code__: PLAN,
        ContextRouter._periodic.__code__: TICK,
        # the tick ends feeding workers as events do: that is per-event work
        ContextRouter._run.__code__: EVENT,
        # a collection that strikes inside the router is no work of the router's
        GCPauses._callback.__code__: None,
    }, default=EVENT)


def calls_per_task(counts: dict[str, int], tasks: int) -> dict[str, float]:
    """The calls counted inside the router, per task: all of them, and by share.

    >>> calls = calls_per_task({EVENT: 300, SEND: 200, PLAN: 50, TICK: 10}, 10)
    >>> calls["calls_per_task"], calls["event_calls_per_task"], calls["plan_calls_per_task"]
    (56.0, 30.0, 5.0)
    """
    return {
        "calls_per_task": round(sum(counts.values()) / tasks, 1),
        "event_calls_per_task": round(counts.get(EVENT, 0) / tasks, 1),
        "send_calls_per_task": round(counts.get(SEND, 0) / tasks, 1),
        "plan_calls_per_task": round(counts.get(PLAN, 0) / tasks, 1),
        "tick_calls_per_task": round(counts.get(TICK, 0) / tasks, 1),
    }


async def run(nworkers: int, ncontexts: int, ntasks: int, routed: bool,
              count: bool = False) -> dict[str, Any]:
    """Run ``ntasks`` tasks over ``ncontexts`` contexts on ``nworkers`` simulated
    workers, with the router (``routed``) or plain Dask, and time them.

    With ``count`` (routed only), count the calls inside the router instead
    (:func:`calls_per_task`): the profiling hook slows the router several times
    over, so the timings of that run are not returned.
    """
    assert routed or not count, "only the router's calls are counted"
    counter = call_counter() if count else None
    names = [f"c{i}" for i in range(ncontexts)]
    specs = [dask_context.ContextSpec(n, dict) for n in names]
    tokens = {s.name: s.token for s in specs}
    pauses = GCPauses()
    async with Scheduler(protocol="inproc", dashboard=False, validate=False) as s:
        workers = [
            SimulatedWorker(s.address, "inproc://" + global_manager.new_address(), held, tokens)
            for held in holdings(nworkers, names)
        ]
        await asyncio.gather(*(w.start() for w in workers))
        placing = time_placements(s, pauses)
        async with Client(s.address, asynchronous=True) as client:
            spent: dict[str, float] = {}
            entered: set[str] = set()
            if routed:
                router = ContextRouter(specs)
                await client.register_plugin(router)
                router = s.plugins["dask-context"]
                entries = entry_points(s, router)
                spent, entered = instrument(router, pauses, entries, counter)
                # the scheduler took these before the wrapping: hand it the timed ones
                for handlers in (s.handlers, s.stream_handlers):
                    for op, handler in handlers.items():
                        owner = getattr(handler, "__self__", None)
                        if owner in entries:
                            handlers[op] = getattr(owner, handler.__name__)
                s.periodic_callbacks["dask-context"].callback = router._periodic
                await asyncio.gather(*(w.announce(s.rpc(s.address)) for w in workers))
            per = ntasks // ncontexts
            await asyncio.sleep(0.5)  # the announcements are handled: time only the tasks
            spent.clear()
            placing.clear()
            if counter is not None:
                counter.clear()
            pauses.start()
            start = time.perf_counter()
            futures = []
            for n in names:
                fn = functools.partial(_touch, context=n)
                if routed:
                    with dask_context.use(n):
                        futures += client.map(fn, range(per), key=[f"{n}-{i}" for i in range(per)])
                else:
                    futures += client.map(fn, range(per), key=[f"{n}-{i}" for i in range(per)])
            await client.wait_for_workers(nworkers)
            from distributed import wait
            await wait(futures)
            wall = time.perf_counter() - start
            pauses.stop()
            spent = dict(spent)  # what the teardown costs is not the tasks' cost
            placed = sum(placing)
            calls = dict(counter.counts) if counter is not None else {}
            done = len(futures)
            del futures
        await asyncio.gather(*(w.close() for w in workers))
    if routed:
        _compat.send = send_untimed
    if count:
        known = {f"{type(o).__name__}.{n}" for o, names in entries.items() for n in names}
        if not entered <= known:
            raise RuntimeError(f"the router was entered through {entered - known}, which "
                               "the timed runs do not time: add them to entry_points")
        return {"workers": nworkers, "contexts": ncontexts, "tasks": done,
                **calls_per_task(calls, done)}
    transitions = spent.pop(SEND, 0.0)
    collected = spent.pop(GC, 0.0)
    inside = sum(spent.values())
    return {
        "workers": nworkers, "contexts": ncontexts, "tasks": done, "routed": routed,
        "wall_s": round(wall, 3), "router_s": round(inside, 4),
        "router_us_per_task": round(1e6 * inside / done, 1),
        "own_us_per_task": round(1e6 * (inside - transitions) / done, 1),
        "placement_us_per_task": round(1e6 * placed / done, 1),
        "gc_in_router_us_per_task": round(1e6 * collected / done, 1),
        "gc_s": round(pauses.seconds, 3), "gc_counts": pauses.counts,
        "top": sorted(((round(v * 1e6 / done, 1), k) for k, v in spent.items()), reverse=True)[:6],
    }


def summarize(routed: list[dict[str, Any]], plain: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per size: the median of each measure over the repeated runs (one
    run of a few seconds on a shared machine varies by 10-20%), and every run's
    router cost.

    >>> r = [{"router_us_per_task": u, "own_us_per_task": u / 2, "gc_in_router_us_per_task": 0.0,
    ...       "placement_us_per_task": 20.0, "wall_s": w, "gc_s": 0.1, "top": [],
    ...       "workers": 16, "contexts": 1, "tasks": 10}
    ...      for u, w in [(30.0, 2.0), (40.0, 3.0), (35.0, 2.5)]]
    >>> p = [{"wall_s": w, "gc_s": 0.1, "placement_us_per_task": d} for w, d in
    ...      [(2.0, 19.0), (2.5, 21.0), (2.4, 22.0)]]
    >>> row = summarize(r, p)
    >>> row["router_us_per_task"], row["router_us_runs"], row["vs_plain"], row["runs"]
    (35.0, [30.0, 40.0, 35.0], 1.04, 3)
    >>> row["placement_us_per_task"], row["plain_placement_us_per_task"]
    (20.0, 21.0)
    """
    def median(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    mid = sorted(routed, key=lambda r: r["router_us_per_task"])[len(routed) // 2]
    row = dict(mid)
    for key in ("router_us_per_task", "own_us_per_task", "gc_in_router_us_per_task",
                "placement_us_per_task", "wall_s", "gc_s"):
        row[key] = round(median(routed, key), 3)
    row["router_us_runs"] = [r["router_us_per_task"] for r in routed]
    for key in ("wall_s", "gc_s", "placement_us_per_task"):
        row[f"plain_{key}"] = round(median(plain, key), 3)
    row["vs_plain"] = round(row["wall_s"] / row["plain_wall_s"], 2)
    row["runs"] = len(routed)
    return row


# the columns of the counting pass, as table() shows them (when the rows have them)
CALL_COLUMNS = {
    "calls_per_task": "calls (per task)",
    "event_calls_per_task": "per-event calls (per task)",
    "send_calls_per_task": "transitions calls (per task)",
    "plan_calls_per_task": "planning calls (per task)",
    "tick_calls_per_task": "tick calls (per task)",
}


def table(rows: list[dict[str, Any]]) -> str:
    """The curve as Markdown: one line per (contexts, workers), with the counted
    calls when the rows have them.

    >>> row = {"contexts": 1, "workers": 16, "tasks": 10, "runs": 1, "router_us_per_task": 30.0,
    ...        "router_us_runs": [30.0], "own_us_per_task": 12.0, "gc_in_router_us_per_task": 0.0,
    ...        "placement_us_per_task": 17.0, "plain_placement_us_per_task": 16.0,
    ...        "wall_s": 2.0, "plain_wall_s": 1.9, "vs_plain": 1.05, "gc_s": 0.1,
    ...        "plain_gc_s": 0.1}
    >>> table([row]).splitlines()[-1]
    '| 1 | 16 | 30.0 | 30.0 | 12.0 | 17.0 | 16.0 | 0.0 | 2.00 | 1.90 | 1.05x | 0.10 | 0.10 |'
    >>> row.update(calls_per_task=200.0, event_calls_per_task=90.0, send_calls_per_task=108.0,
    ...            plan_calls_per_task=1.5, tick_calls_per_task=0.5)
    >>> table([row]).splitlines()[-1]  # doctest: +ELLIPSIS
    '| 1 | 16 | 30.0 | ... | 0.10 | 200.0 | 90.0 | 108.0 | 1.5 | 0.5 |'
    """
    counted = [key for key in CALL_COLUMNS if key in rows[0]]
    # the timings vary with the machine's speed; these counts do not
    about_calls = (
        " The `calls` columns come from one more routed run per size, apart from the "
        "timed ones: Python and C function calls made inside the router's methods, per "
        "task. `per-event`: the router's own work on scheduler events; `transitions`: "
        "inside the scheduler transitions that placing a task runs, less the router's "
        "hook they call (per-event work, unlike in `router`); `planning`: in "
        "`_replan` (amortized: at most a share of the scheduler's time, however many "
        "workers a plan looks at); `tick`: the routing tick's housekeeping (it runs by "
        "the clock, not per event). `calls` is all of them."
    ) if counted else ""
    lines = [
        "# Router cost against cluster size",
        "",
        "`python -m benchmarks.router_scale`: a real Scheduler and the real router, with "
        "simulated workers over in-process comms (see the module's docstring). "
        f"{rows[0]['tasks']} trivial tasks per size; each arm runs {rows[0]['runs']} times, "
        "alternated, and each column is the median (`router runs`: every run). `router`: "
        "microseconds per task inside "
        "the router's methods, including the scheduler transitions that placing a task runs "
        "(plain Dask runs those too, in its own placement); `own`: without them. "
        "`Dask placement`: microseconds per task in the scheduler's transitions of tasks "
        "to `processing` (inside `router` for the routed arm, from `no-worker`; in "
        "Dask's own handlers for plain Dask, mostly from `queued`), the router's hook "
        "they call included. Garbage "
        "collections are timed apart, wherever they strike: `gc in router` is the share "
        "that struck inside the router, `gc` the whole run's pauses for each arm. "
        "The timings follow the machine's speed, which varies by half or more on a "
        "shared VM: set the router's against plain Dask's placement, measured in the "
        "same run, which runs the same kind of code."
        + about_calls,
        "",
        "| contexts | workers | router (us/task) | router runs | own (us/task) | "
        "Dask placement, routed (us/task) | Dask placement, plain (us/task) | "
        "gc in router (us/task) | wall (s) | plain wall (s) | wall vs plain | gc (s) | "
        "plain gc (s) |" + "".join(f" {CALL_COLUMNS[key]} |" for key in counted),
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(counted),
    ]
    for r in rows:
        lines.append(
            f"| {r['contexts']} | {r['workers']} | {r['router_us_per_task']:.1f} | "
            f"{', '.join(f'{u:.1f}' for u in r['router_us_runs'])} | "
            f"{r['own_us_per_task']:.1f} | {r['placement_us_per_task']:.1f} | "
            f"{r['plain_placement_us_per_task']:.1f} | {r['gc_in_router_us_per_task']:.1f} | "
            f"{r['wall_s']:.2f} | {r['plain_wall_s']:.2f} | {r['vs_plain']:.2f}x | "
            f"{r['gc_s']:.2f} | {r['plain_gc_s']:.2f} |"
            + "".join(f" {r[key]:.1f} |" for key in counted)
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each arm per size, alternated; the table shows medians")
    parser.add_argument("--count", action=argparse.BooleanOptionalAction, default=True,
                        help="count the calls inside the router, in one more routed run per "
                             "size, apart from the timed runs (the profiling hook slows them)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write router_scale.json and router_scale.md into this folder")
    args = parser.parse_args()
    rows = []
    # the active memory manager and heartbeats would talk to workers that are not there
    with dask.config.set({"distributed.scheduler.active-memory-manager.start": False,
                          "distributed.scheduler.worker-ttl": None}):
        for ncontexts in args.contexts:
            for nworkers in args.workers:
                plain, routed = [], []
                for _ in range(args.repeat):
                    plain.append(asyncio.run(run(nworkers, ncontexts, args.tasks, routed=False)))
                    routed.append(asyncio.run(run(nworkers, ncontexts, args.tasks, routed=True)))
                row = summarize(routed, plain)
                if args.count:
                    row.update(asyncio.run(
                        run(nworkers, ncontexts, args.tasks, routed=True, count=True)))
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(
                        f"{nworkers:5d} workers {ncontexts:4d} contexts: "
                        f"{row['router_us_per_task']:7.1f} us/task in the router "
                        f"({row['own_us_per_task']:.1f} without Dask's transitions; runs "
                        f"{row['router_us_runs']}), wall {row['wall_s']:.2f} s vs plain "
                        f"{row['plain_wall_s']:.2f} s ({row['vs_plain']:.2f}x); collections "
                        f"{row['gc_s']:.2f} s vs {row['plain_gc_s']:.2f} s  top: {row['top'][:3]}",
                        flush=True,
                    )
                    if args.count:
                        print(
                            f"{'':25}{row['calls_per_task']:7.1f} calls/task in the router: "
                            f"{row['event_calls_per_task']:.1f} per event, "
                            f"{row['send_calls_per_task']:.1f} in Dask's transitions, "
                            f"{row['plan_calls_per_task']:.1f} planning, "
                            f"{row['tick_calls_per_task']:.1f} in ticks",
                            flush=True,
                        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "router_scale.json").write_text(json.dumps(rows, indent=1))
        (args.out / "router_scale.md").write_text(table(rows))


if __name__ == "__main__":
    main()
