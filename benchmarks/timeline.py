"""Where a Dask arm's time went, from the scheduler's task stream.

The limit ``T*`` assumes every worker computes from the first to the last second,
loads only as often as it must, and infers at the calibrated speed. The difference
between an arm's wall time and ``T*`` (in worker-seconds, divided by the workers) is
split into:

- ``extra_loads``: load seconds beyond the minimum number of loads;
- ``slow_tasks``: task compute time beyond loads plus calibrated inference (task
  overhead in the worker, contention, slower inference);
- ``startup``: time from submission to each initial worker's first task or load
  (routing, feeding, the scheduler's start);
- ``gaps``: idle time between two tasks of a worker (scheduling latency: the
  worker waits for its next task);
- ``tail``: idle time after a worker's last task while others still run
  (imbalance at the end);
- ``other``: the rest (preemption: work lost with killed workers, restarts).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


def compute_spans(records: Iterable[Mapping[str, Any]], start: float, stop: float) -> dict[str, list[tuple[float, float]]]:
    """Compute intervals per worker from task-stream records, clipped to ``[start, stop]``."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for rec in records:
        for ss in rec.get("startstops", ()):
            if ss.get("action") == "compute" and ss["stop"] >= start and ss["start"] <= stop:
                spans[rec["worker"]].append((max(ss["start"], start), min(ss["stop"], stop)))
    return {w: sorted(s) for w, s in spans.items()}


def add_loads(spans: dict[str, list[tuple[float, float]]], loads: Iterable[tuple[str, float, float]],
              start: float, stop: float) -> dict[str, list[tuple[float, float]]]:
    """Add to ``spans`` the loads ``(worker, start, stop)`` that ran outside every task
    of their worker: a worker loading a context before its tasks (dask-context warms
    workers that way) is busy, not idle, as one loading inside a task is.

    >>> add_loads({"a": [(2.0, 3.0)], "b": [(1.0, 4.0)]}, [("a", 0.0, 2.0), ("b", 1.5, 3.0)], 0.0, 4.0)
    {'a': [(0.0, 2.0), (2.0, 3.0)], 'b': [(1.0, 4.0)]}
    """
    out = {w: list(s) for w, s in spans.items()}
    for w, a, b in loads:
        inside = any(x <= a and b <= y for x, y in spans.get(w, ()))
        if not inside and b >= start and a <= stop:
            out.setdefault(w, []).append((max(a, start), min(b, stop)))
    return {w: sorted(s) for w, s in out.items()}


def breakdown(
    records: Iterable[Mapping[str, Any]],
    *,
    start: float,
    stop: float,
    workers: int,
    initial: Iterable[str],
    final: Iterable[str],
    load_seconds: float,
    min_load_seconds: float,
    inference_seconds: float,
    loads: Iterable[tuple[str, float, float]] = (),
) -> dict[str, float]:
    """Split ``wall - limit`` of one arm into the parts listed in the module docstring.

    Parameters
    ----------
    records
        ``client.get_task_stream(start=...)`` of the arm.
    start, stop
        Wall-clock times (``time.time()``) of submission and of the last result.
    workers
        Worker processes the cluster is meant to have.
    initial, final
        Worker addresses at the start and at the end of the arm.
    load_seconds
        Seconds of all loads of the arm (from the load log).
    min_load_seconds
        Seconds of the loads the limit allows.
    inference_seconds
        Calibrated pure inference seconds of all the arm's claims.
    loads
        ``(worker, start, stop)`` of each finished load: those outside the worker's
        tasks count as its busy time (see :func:`add_loads`).

    Returns
    -------
    Seconds of wall time each part accounts for (worker-seconds / ``workers``), plus
    ``compute`` (all task compute, same unit) and ``tasks_seen``.

    Examples
    --------
    Two workers, one idle for a second at the start and a second at the end:

    >>> recs = [
    ...     {"worker": "a", "startstops": [{"action": "compute", "start": 0.0, "stop": 4.0}]},
    ...     {"worker": "b", "startstops": [{"action": "compute", "start": 1.0, "stop": 3.0}]},
    ... ]
    >>> bd = breakdown(recs, start=0.0, stop=4.0, workers=2, initial=["a", "b"], final=["a", "b"],
    ...                load_seconds=2.0, min_load_seconds=2.0, inference_seconds=4.0)
    >>> {k: bd[k] for k in ("extra_loads", "slow_tasks", "startup", "gaps", "tail", "other")}
    {'extra_loads': 0.0, 'slow_tasks': 0.0, 'startup': 0.5, 'gaps': 0.0, 'tail': 0.5, 'other': 0.0}
    """
    spans = add_loads(compute_spans(records, start, stop), loads, start, stop)
    initial, final = set(initial), set(final)
    compute = sum(b - a for s in spans.values() for a, b in s)
    startup = sum(s[0][0] - start for w, s in spans.items() if w in initial)
    # workers that never ran a task idle for the whole run
    startup += sum(stop - start for w in initial & final if w not in spans)
    gaps = sum(max(0.0, b[0] - a[1]) for s in spans.values() for a, b in itertools.pairwise(s))
    tail = sum(stop - s[-1][1] for w, s in spans.items() if w in final)
    wall = stop - start
    idle = workers * wall - compute
    parts = {
        "extra_loads": load_seconds - min_load_seconds,
        "slow_tasks": compute - load_seconds - inference_seconds,
        "startup": startup,
        "gaps": gaps,
        "tail": tail,
        "other": idle - startup - gaps - tail,
    }
    out = {k: v / workers for k, v in parts.items()}
    out["compute"] = compute / workers
    out["tasks_seen"] = float(sum(len(s) for s in spans.values()))
    return out
