"""Simulated preemption: SIGKILL worker processes while a computation runs.

The LocalCluster's nannies restart killed workers (new process, new address, cold),
as a batch system backfills a preempted node. The schedule is the same for every
arm: a first kill once a quarter of the results are in (so that every arm, however
fast, loses a warm worker mid-run), then one kill every ``interval`` seconds (so that
an arm that runs longer is preempted more often, as on opportunistic resources).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from distributed import Client

logger = logging.getLogger(__name__)

# seconds a worker has been connected before it may be killed
SETTLED = 2.0


class Preemptor:
    """Kill a random worker process now and then, in a background thread.

    Parameters
    ----------
    client
        Client of the cluster.
    progress
        Returns the fraction of the computation's results received (0 to 1); it
        times the first kill, and kills stop at 1.
    interval
        Seconds between kills after the first.
    first_fraction
        Fraction of ``futures`` done before the first kill.
    seed
        Seed of the choice of victims.

    Examples
    --------
    .. code-block:: python

        with Preemptor(client, lambda: done / total, interval=20) as p:
            ...  # collect the results
        p.kills  # [{"time": ..., "worker": ..., "pid": ...}, ...]
    """

    def __init__(
        self,
        client: Client,
        progress: Callable[[], float],
        interval: float,
        first_fraction: float = 0.25,
        seed: int = 0,
    ):
        self.client = client
        self.progress = progress
        self.interval = interval
        self.first_fraction = first_fraction
        self.kills: list[dict[str, Any]] = []
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._first = threading.Event()
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="preemptor", daemon=True)

    def __enter__(self) -> Preemptor:
        # the workers there are now have been up long enough
        self._seen = dict.fromkeys(self.client.scheduler_info()["workers"], -math.inf)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def first_kill(self) -> None:
        """Make the first kill now if the first fraction is done and none was made.

        The collector calls this after each result, so that every arm loses a warm
        worker however fast it runs (a thread polling the progress could miss a
        short arm altogether).
        """
        with self._lock:  # the collector and the thread may both try
            if not self._first.is_set() and self.first_fraction <= self.progress() < 1.0:
                if self._kill():
                    self._first.set()

    def _loop(self) -> None:
        # after the first kill (made by the collector, or here if no result comes),
        # one every `interval` seconds
        while not self._stop.is_set() and not self._first.is_set():
            if self.progress() >= self.first_fraction:
                self.first_kill()
            self._stop.wait(0.05)
        while not self._stop.wait(self.interval) and self.progress() < 1.0:
            self._kill()

    def _kill(self) -> bool:
        try:
            return self._kill_one()
        except Exception:  # a kill racing a restart must not end the benchmark
            logger.exception("Preemption failed")
            return False

    def _kill_one(self) -> bool:
        pids: dict[str, int] = self.client.run(os.getpid, on_error="ignore")
        now = time.monotonic()
        for address in pids:
            self._seen.setdefault(address, now)
        # only workers up for a while: a LocalCluster nanny does not restart a worker
        # killed while the nanny is still starting it, and would leave the cluster a
        # worker short for good (a batch system starts a new job instead)
        up = sorted(a for a in pids if now - self._seen[a] >= SETTLED)
        if not up:
            return False
        worker = self._rng.choice(up)
        os.kill(pids[worker], signal.SIGKILL)
        self.kills.append({"time": time.time(), "worker": worker, "pid": pids[worker]})
        logger.info("Preempted %s (pid %d)", worker, pids[worker])
        return True
