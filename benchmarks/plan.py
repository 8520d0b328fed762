"""The scenarios, and how big each run is once ``L`` and ``t`` are known.

Sizes are set in units of the measured load time, so that a busy machine (slower
loads and inference) makes every run proportionally longer rather than changing
which regime is measured:

- the batch size ``B`` of a regime ``r`` makes one load cost ``r`` times the
  inference of one task: ``L = r * B * t``;
- the number of claims ``N`` per model gives each worker ``work`` loads' worth of
  pure inference: ``N * t / W = work * L``.

The reduction a run can show is bounded by its shape. Without any overhead,
dask-context takes ``L + N t / W`` and load-per-task ``(1 + r) N t / W``, so the
reduction is at most ``1 - (1 + 1/work) / (1 + r)``: reaching the papers' -72.1% at
``r = 2.75`` needs ``work >= 22``. Regimes with a small ``work`` keep the
load-per-task arm (``(1 + r) * work`` loads' worth of time) affordable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchmarks.calibrate import Calibration, batch_for

PAPER2 = 2.75
"""Load / per-task inference of arXiv 2510.14024's fact verification (-72.1%)."""
HPDC = 17.0
"""Load / per-task inference of HPDC'24's ResNet50 inference (-94.5%)."""
LARGE = 0.7
"""A batch large enough that a load is cheap next to a task: the papers' claim that
warm contexts make the batch size matter little is checked against it."""


@dataclass(frozen=True)
class Scenario:
    """One experimental setting, run at one or more regimes.

    Attributes
    ----------
    name
        Short name (``--scenarios``).
    title
        What it shows, for the report.
    regimes
        Target ratios load / per-task inference.
    work
        Pure inference per worker and model, in loads, one per regime.
    models
        Models in the pipeline (several: every batch is judged by each, then voted).
    preempt
        Kill worker processes during the run.
    budget_models
        Per-worker memory budget in models (None: unlimited); 1.5 fits one model.
    peers
        Peers that run in this scenario, if asked for.
    """

    name: str
    title: str
    regimes: tuple[float, ...]
    work: tuple[float, ...]
    models: int = 1
    preempt: bool = False
    budget_models: float | None = None
    peers: tuple[str, ...] = ("global-cache",)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "single", "one model, batch-size sweep", regimes=(HPDC, PAPER2, LARGE),
            work=(6.0, 30.0, 8.0), peers=("global-cache", "ray"),
        ),
        Scenario(
            "preempt", "one model, workers preempted and replaced",
            regimes=(PAPER2,), work=(12.0,), preempt=True,
        ),
        Scenario(
            "multi", "3 models, budget of 1 model per worker",
            regimes=(PAPER2,), work=(5.0,), models=3, budget_models=1.5,
        ),
    ]
}


@dataclass(frozen=True)
class Run:
    """One scenario at one regime: what every arm of it computes."""

    scenario: Scenario
    regime: float
    batch: int
    items: int
    """Claims per model."""

    @property
    def tasks(self) -> int:
        """Model tasks (votes not counted)."""
        return self.scenario.models * self.items // self.batch

    @property
    def label(self) -> str:
        return f"{self.scenario.name} B={self.batch}"


@dataclass(frozen=True)
class Limits:
    """Bounds on the sizes of runs."""

    min_items: int = 16
    max_items: int = 20_000
    max_batch: int = 4096


LIMITS = Limits()
QUICK_LIMITS = Limits(min_items=16, max_items=32, max_batch=8)


def size_run(scenario: Scenario, regime: float, work: float, cal: Calibration, workers: int, limits: Limits) -> Run:
    """Batch size and claims for one regime of ``scenario``.

    Examples
    --------
    >>> cal = Calibration(load_seconds=1.7, load_samples=[1.7], item_seconds={1: 0.02})
    >>> run = size_run(SCENARIOS["single"], PAPER2, 25.0, cal, workers=2, limits=Limits())
    >>> run.batch, run.items, run.tasks
    (31, 4247, 137)
    """
    batch = cal.batches.get(regime) or guess_batch(regime, cal, limits)
    t = cal.t(batch)
    items = work * cal.load_seconds * workers / t
    items = min(limits.max_items, max(limits.min_items, items))
    # whole batches only
    items = max(batch, batch * round(items / batch))
    return Run(scenario, regime, batch, int(items))


def guess_batch(regime: float, cal: Calibration, limits: Limits) -> int:
    """Batch size of ``regime`` from the per-item times measured so far.

    t depends on B (batching amortises per-call costs), so B is settled against the
    nearest measured t; the caller measures t at the result and may correct it.
    """
    batch = batch_for(regime, cal.load_seconds, cal.t(1), limits.max_batch)
    for _ in range(4):
        again = batch_for(regime, cal.load_seconds, cal.t(batch), limits.max_batch)
        if again == batch:
            break
        batch = again
    return batch


def neighbours(batch: int, limits: Limits) -> set[int]:
    """Batch sizes worth measuring around ``batch``: its neighbours when it is small.

    Examples
    --------
    >>> sorted(neighbours(2, Limits())), sorted(neighbours(30, Limits()))
    ([1, 2, 3], [30])
    """
    if batch > 4:
        return {batch}
    return {b for b in (batch - 1, batch, batch + 1) if 1 <= b <= limits.max_batch}


def closest_batch(regime: float, load_seconds: float, item_seconds: dict[int, float]) -> int:
    """The measured batch size whose ratio ``L / (B t(B))`` is closest to ``regime``.

    Closeness is measured as a ratio (``|log(realised / regime)|``).

    Examples
    --------
    >>> closest_batch(17, 1.7, {1: 0.05, 2: 0.05, 3: 0.05})  # ratios 34, 17, 11.3
    2
    """
    def distance(b: int) -> float:
        return abs(math.log(load_seconds / (b * item_seconds[b]) / regime))

    return min(sorted(item_seconds), key=distance)


def regimes(names: list[str]) -> list[float]:
    """The regimes the scenarios ``names`` run at."""
    return sorted({r for name in names for r in SCENARIOS[name].regimes}, reverse=True)


def plan(names: list[str], cal: Calibration, workers: int, limits: Limits) -> list[Run]:
    """Every run of the scenarios ``names``, in order."""
    runs: list[Run] = []
    for name in names:
        s = SCENARIOS[name]
        for regime, work in zip(s.regimes, s.work, strict=True):
            run = size_run(s, regime, work, cal, workers, limits)
            # small models or tight limits can map two regimes to one batch size
            if not any(r.scenario == s and r.batch == run.batch for r in runs):
                runs.append(run)
    return runs


def limit(run: Run, cal: Calibration, workers: int) -> float:
    """The physical limit of a run: the fewest loads, then pure inference, spread evenly.

    Every worker must load at least one model, and every model must be loaded at
    least once, so ``max(models, workers)`` loads; with perfect balance the run
    takes ``(loads * L + models * N * t) / W``. For one model this is
    ``L + N t / W``, the papers' ``T*``.

    Examples
    --------
    >>> cal = Calibration(load_seconds=2.0, load_samples=[2.0], item_seconds={10: 0.01})
    >>> s = SCENARIOS["single"]
    >>> limit(Run(s, PAPER2, 10, 1000), cal, workers=2)
    7.0
    >>> limit(Run(SCENARIOS["multi"], PAPER2, 10, 1000), cal, workers=2)
    18.0
    """
    m = run.scenario.models
    loads = max(m, workers)
    return (loads * cal.load_seconds + m * run.items * cal.t(run.batch)) / workers


def ideal_load_per_task(run: Run, cal: Calibration, workers: int) -> float:
    """Load-per-task time without any scheduling overhead: every task loads."""
    return run.tasks * (cal.load_seconds + run.batch * cal.t(run.batch)) / workers


def realized_ratio(run: Run, cal: Calibration) -> float:
    """The regime a run really has: ``L / (B * t(B))`` with the measured constants."""
    return cal.load_seconds / (run.batch * cal.t(run.batch))


def budget_bytes(scenario: Scenario, cal: Calibration) -> int | None:
    """The per-worker memory budget of a scenario, in bytes."""
    if scenario.budget_models is None:
        return None
    return math.ceil(scenario.budget_models * cal.nbytes)
