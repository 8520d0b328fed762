"""Simulated preemption: take worker processes away while a computation runs.

The schedule is the same for every arm: a first preemption once a quarter of the
results are in (so that every arm, however fast, loses a warm worker mid-run), then
one every ``interval`` seconds (so that an arm that runs longer is preempted more
often, as on opportunistic resources). Two kinds:

- :class:`Preemptor`: SIGKILL, no warning. The LocalCluster's nannies restart killed
  workers (new process, new address, cold), as a batch system backfills a preempted
  node;
- :class:`WarningPreemptor`: SIGTERM first (the warning of SLURM, Kubernetes or a
  cloud's spot notice), SIGKILL ``grace`` seconds later unless the worker left by
  itself; a new worker process, started at the warning, takes its place.
"""

from __future__ import annotations

import copy
import itertools
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
# seconds between looks at whether a warned worker has left
POLL = 0.1
# names of the workers started in place of warned ones, unique in this process
_REPLACEMENTS = itertools.count()


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
        """SIGKILLs sent."""
        self.warnings: list[dict[str, Any]] = []
        """Warnings (SIGTERM) sent; only :class:`WarningPreemptor` sends them."""
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._first = threading.Event()
        self._seen: dict[str, float] = {}
        # workers preempted already: a warned worker is still connected while it drains
        self._struck: set[str] = set()
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
        up = sorted(a for a in pids if now - self._seen[a] >= SETTLED and a not in self._struck)
        if not up:
            return False
        worker = self._rng.choice(up)
        self._struck.add(worker)
        self._preempt(worker, pids[worker])
        return True

    def _preempt(self, worker: str, pid: int) -> None:
        """Take ``worker`` (process ``pid``) away: SIGKILL; its nanny starts it again, cold."""
        self._sigkill(worker, pid)

    def _sigkill(self, worker: str, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.kills.append({"time": time.time(), "worker": worker, "pid": pid})
        logger.info("Preempted %s (pid %d)", worker, pid)


class WarningPreemptor(Preemptor):
    """Warn a worker (SIGTERM), kill it ``grace`` seconds later, then replace it.

    The warning goes to the worker process, as SLURM and Kubernetes send it: with
    dask-context's preemption plugins enabled (``dask_context.register`` does it)
    the worker drains and leaves with its nanny, which then does not restart it. A
    worker still connected when the grace is over is killed (SIGKILL). A new worker
    process (a new nanny of the LocalCluster) is started at the warning, as
    ContextAdaptive asks the batch system for a replacement at the warning; SIGKILL
    arms get theirs from the nanny when the process dies.

    The wait for each warned worker runs in a thread of its own, so that a warning
    never holds up the collection of results; leaving the ``with`` block waits for
    them, so that the cluster is whole again afterwards.

    Parameters
    ----------
    client
        Client of a LocalCluster (``client.cluster``: replacements are started there).
    progress, interval, first_fraction, seed
        As for :class:`Preemptor`.
    grace
        Seconds from the warning to the kill.

    Examples
    --------
    .. code-block:: python

        with WarningPreemptor(client, lambda: done / total, interval=20, grace=10) as p:
            ...  # collect the results
        p.warnings  # [{"time": ..., "worker": ..., "pid": ..., "left_after": 0.4}, ...]
    """

    def __init__(
        self,
        client: Client,
        progress: Callable[[], float],
        interval: float,
        grace: float,
        first_fraction: float = 0.25,
        seed: int = 0,
    ):
        super().__init__(client, progress, interval, first_fraction=first_fraction, seed=seed)
        self.grace = grace
        self._followers: list[threading.Thread] = []

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        # no warning is made from here on: the list is complete
        for follower in self._followers:
            follower.join()

    def _preempt(self, worker: str, pid: int) -> None:
        name = self.client.scheduler_info()["workers"][worker]["name"]
        os.kill(pid, signal.SIGTERM)
        warning: dict[str, Any] = {
            "time": time.time(), "worker": worker, "pid": pid, "left_after": None,
        }
        self.warnings.append(warning)
        logger.info("Warned %s (pid %d): killed in %.1f s unless it leaves", worker, pid, self.grace)
        # the replacement is asked for at the warning, as ContextAdaptive does on a
        # batch system, so that it starts while the warned worker drains
        self._add_replacement()
        follower = threading.Thread(
            target=self._follow, args=(warning, name), name="preemptor-grace", daemon=True
        )
        self._followers.append(follower)
        follower.start()

    def _follow(self, warning: dict[str, Any], name: Any) -> None:
        """Wait until the warned worker left or its grace is over; kill it then; replace it."""
        worker = warning["worker"]
        try:
            deadline = warning["time"] + self.grace
            while worker in self.client.scheduler_info()["workers"] and time.time() < deadline:
                time.sleep(POLL)
            if worker in self.client.scheduler_info()["workers"]:
                logger.warning("%s did not leave within its grace of %.1f s", worker, self.grace)
                self._sigkill(worker, warning["pid"])
            else:
                warning["left_after"] = time.time() - warning["time"]
                logger.info("%s left %.2f s after its warning", worker, warning["left_after"])
            self._drop(name)
        except Exception:  # a failed replacement must not end the benchmark
            logger.exception("Preemption of %s failed", worker)

    def _add_replacement(self) -> None:
        """Start a new worker process in the LocalCluster, under a new name."""
        cluster = self.client.cluster

        def add() -> None:
            cluster.worker_spec[f"replacement-{next(_REPLACEMENTS)}"] = copy.copy(cluster.new_spec)
            cluster.scale(len(cluster.worker_spec))

        cluster.loop.add_callback(add)

    def _drop(self, name: Any) -> None:
        """Take the warned worker ``name`` out of the LocalCluster once it is gone.

        Its nanny is closed with it (a killed worker's nanny would otherwise start
        it again).
        """
        cluster = self.client.cluster

        def drop() -> None:
            cluster.worker_spec.pop(name, None)
            cluster.scale(len(cluster.worker_spec))

        cluster.loop.add_callback(drop)
