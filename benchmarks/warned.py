"""The warned preemption arms: dask-context with drain, and with peer bootstrap (issue 11.3b).

They run in the ``preempt`` scenario after the SIGKILL arms: the same claims, batch
size, limit ``T*``, preemption schedule and cluster. ``dask-context warned+peers``
differs from the ``dask-context`` arm there in two ways; ``dask-context warned`` only
in the first, so that the two effects can be told apart:

- every preemption is warned (:class:`benchmarks.preempt.WarningPreemptor`): SIGTERM
  to the worker process, which drains (:mod:`dask_context.preemption`: it goes on
  working until its replacement is warm, at most half the grace, then starts no new
  task, gives back those it has not started, finishes its running one, moves its
  results to a peer and leaves with its nanny), SIGKILL ``grace`` seconds later if it
  is still there; a new worker process, started at the warning, replaces it;
- the context is declared with ``files=`` (the checkpoint directory). Each worker
  process is a node of its own (:class:`benchmarks.tasks.NodePerProcess`), so a
  replacement stages the checkpoint into an empty node-local directory: from a warm
  peer (streamed over a connection of its own). Only the staging's reads of the
  checkpoint itself go to the emulated storage, at ``--storage-mbps``
  (:class:`benchmarks.coldstart.SharedStorage`, which also counts the bytes): one
  worker reads it when the arm starts, while the other follows that copy as it is
  made (streamed from that worker as it lands), and no worker reads it again while a
  peer holds a copy. The loader (:func:`benchmarks.loading.load_staged`) loads the
  staged copy as the staging left it, in the page cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from distributed import Client

import dask_context
from benchmarks.arms import ArmSetup, DaskContext, Model
from benchmarks.coldstart import SharedStorage, StagingReadsSharedStorage
from benchmarks.loading import load_staged
from dask_context import preemption
from dask_context.worker import TOPIC


class Warned(DaskContext):
    """dask-context, its workers warned ``grace`` seconds before a preemption's kill.

    Parameters
    ----------
    grace
        Seconds from a warning to the kill.
    """

    name = "dask-context warned"

    def __init__(self, grace: float):
        self.grace = grace
        self._since = 0.0

    def setup(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> None:
        self._since = time.time()
        super().setup(client, models, arm)
        # after register, which enables draining with dask-context's default grace
        preemption.enable(client, grace=self.grace)

    def teardown(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> dict[str, Any]:
        """Unregister; report how each drain went.

        Adds ``drained`` to the router's counts: seconds from the warning to the
        end of the drain, seconds of them it went on working (until its replacement
        was warm), tasks given back and given up, and whether the results were
        moved, per drained worker.
        """
        drained = [m for _, m in client.get_events(preemption.TOPIC)
                   if m.get("action") == "drained" and m["signalled"] >= self._since]
        out = super().teardown(client, models, arm)
        # the next arm's register enables draining again, with dask-context's settings
        preemption.disable(client)
        out["drained"] = [
            {"seconds": m["seconds"], "worked": m.get("worked", 0.0), "retired": m["retired"],
             "given_back": len(m["given_back"]), "abandoned": len(m["abandoned"])}
            for m in drained
        ]
        return out


class WarnedPeers(Warned):
    """:class:`Warned`, with the checkpoint staged from peers (``files=``).

    Parameters
    ----------
    grace
        Seconds from a warning to the kill.
    storage
        The emulated storage the staging reads the checkpoint from.
    """

    name = "dask-context warned+peers"

    def __init__(self, grace: float, storage: SharedStorage):
        super().__init__(grace)
        self.storage = storage
        self._delivered = 0

    def spec(self, model: Model, arm: ArmSetup) -> dask_context.ContextSpec:
        return dask_context.ContextSpec(
            self.context(model, arm), load_staged, files=model.path,
            kwargs={**arm.load, "source": model.path}, memory=arm.nbytes, load_time=arm.load_seconds,
        )

    def setup(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> None:
        client.register_plugin(StagingReadsSharedStorage(self.storage))
        self._delivered = self.storage.delivered()
        super().setup(client, models, arm)

    def teardown(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> dict[str, Any]:
        """As :meth:`Warned.teardown`; also where each worker's copy came from.

        Adds ``staged`` (origin, bytes and seconds of each copy) and ``source_bytes``
        (read from the storage).
        """
        names = {self.context(m, arm) for m in models}
        staged = [m for _, m in client.get_events(TOPIC)
                  if m.get("action") == "staged" and m.get("context") in names]
        out = super().teardown(client, models, arm)
        out["staged"] = [{k: m[k] for k in ("origin", "nbytes", "seconds")} for m in staged]
        out["source_bytes"] = self.storage.delivered() - self._delivered
        return out
