"""Measure the physical constants of the run: load time ``L`` and inference time ``t``.

Both are measured on the benchmark's own workers, on all of them at once (as the
arms run), at the start of the run, so that the cost regimes and the limit use the
machine's state of the day. :func:`batch_for` turns a target regime into a batch
size.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dask.sizeof import sizeof
from distributed import Client

from benchmarks.loading import load_model
from dask_context.factcheck import judge

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Constants measured on the workers.

    Attributes
    ----------
    load_seconds
        ``L``: median seconds of one model load (cold read plus ``load_causal_lm``).
    load_samples
        Every load measured.
    item_seconds
        ``t`` per batch size: median seconds of judging a batch of ``B`` claims,
        divided by ``B``.
    nbytes
        Size of a loaded model (what ``dask.sizeof`` and dask-context measure).
    batches
        Batch size chosen for each regime (load / per-task inference), once known.
    """

    load_seconds: float
    load_samples: list[float]
    item_seconds: dict[int, float] = field(default_factory=dict)
    nbytes: int = 0
    batches: dict[float, int] = field(default_factory=dict)

    def merge(self, other: Calibration) -> Calibration:
        """Both calibrations' samples together; ``L`` is the median of all loads."""
        samples = self.load_samples + other.load_samples
        return Calibration(
            load_seconds=statistics.median(samples),
            load_samples=samples,
            item_seconds={**self.item_seconds, **other.item_seconds},
            nbytes=max(self.nbytes, other.nbytes),
            batches={**self.batches, **other.batches},
        )

    def t(self, batch: int) -> float:
        """Per-item inference seconds at ``batch`` (the nearest measured batch size)."""
        nearest = min(self.item_seconds, key=lambda b: (abs(b - batch), b))
        return self.item_seconds[nearest]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    path: str,
    load: dict[str, Any],
    claims: Sequence[str],
    batches: Sequence[int],
    loads: int,
    min_seconds: float,
) -> dict[str, Any]:
    """Task: time ``loads`` loads, then judging batches of each size in ``batches``.

    Each batch size is timed for at least ``min_seconds`` (and at least twice) after
    one untimed warm-up batch.
    """
    samples = []
    model = None
    for _ in range(max(1, loads)):
        model = None  # free the previous copy before the next load
        t0 = time.perf_counter()
        model = load_model(path, **load)
        samples.append(time.perf_counter() - t0)
    item: dict[int, float] = {}
    for b in batches:
        batch = list(claims[:b])
        judge(model, batch)
        times: list[float] = []
        while len(times) < 2 or sum(times) < min_seconds:
            t0 = time.perf_counter()
            judge(model, batch)
            times.append(time.perf_counter() - t0)
        item[b] = statistics.median(times) / b
    return {"loads": samples, "items": item, "nbytes": int(sizeof(model))}


def calibrate(
    client: Client,
    path: str,
    load: dict[str, Any],
    claims: Sequence[str],
    batches: Sequence[int],
    loads: int = 2,
    min_seconds: float = 1.0,
) -> Calibration:
    """Run :func:`measure` on every worker at once and combine the results."""
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    futures = [
        client.submit(
            measure, path, load, list(claims), list(batches), loads, min_seconds,
            workers=[w], pure=False, key=f"calibrate-{i}-{time.time_ns()}",
        )
        for i, w in enumerate(workers)
    ]
    results = client.gather(futures)
    samples = [s for r in results for s in r["loads"]]
    items = {b: statistics.median(r["items"][b] for r in results) for b in batches}
    cal = Calibration(
        load_seconds=statistics.median(samples),
        load_samples=samples,
        item_seconds=items,
        nbytes=max(r["nbytes"] for r in results),
    )
    logger.info(
        "Calibration: L = %.2f s (%s), t = %s",
        cal.load_seconds, ", ".join(f"{s:.2f}" for s in samples),
        ", ".join(f"B={b}: {t * 1e3:.1f} ms" for b, t in items.items()),
    )
    return cal


def batch_for(ratio: float, load_seconds: float, item_seconds: float, largest: int = 4096) -> int:
    """Items per task at which a load costs ``ratio`` times the task's inference.

    Examples
    --------
    >>> batch_for(17, load_seconds=1.7, item_seconds=0.02)
    5
    >>> batch_for(2.75, load_seconds=1.7, item_seconds=0.02)
    31
    >>> batch_for(17, load_seconds=0.01, item_seconds=0.02)  # never below one item
    1
    """
    return int(min(largest, max(1, round(load_seconds / (ratio * item_seconds)))))
