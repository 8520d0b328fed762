"""The Dask arms: the same pipeline, three ways of getting the model into the task.

Every arm builds the same ``dask.delayed`` graph with :func:`pipeline`: one task per
batch and model, and with several models one ``vote`` task per batch on top. Only
:meth:`DaskArm.task` differs:

- ``load-per-task``: :func:`benchmarks.tasks.load_per_task`, no reuse;
- ``dask-context``: :func:`dask_context.factcheck.verify` inside
  ``dask_context.use(name)``, with one :class:`~dask_context.ContextSpec` per model;
- ``global-cache``: :func:`benchmarks.tasks.cached_judge`, a lazy module-level cache
  of one model per worker process, no routing.

The preemption scenario adds dask-context with warned preemptions and peer bootstrap
(:mod:`benchmarks.warned`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import dask
from dask.delayed import Delayed
from distributed import Client

import dask_context
from benchmarks.loading import load_model
from benchmarks.tasks import cached_judge, clear_cache, load_per_task, vote
from dask_context.factcheck import verify

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Model:
    """A generated checkpoint of the pipeline."""

    name: str
    path: str


@dataclass
class ArmSetup:
    """What an arm needs to know about the run it is part of.

    Attributes
    ----------
    tag
        Unique among the arms of one benchmark run; prefixes task keys and context
        names, so that nothing the scheduler learnt in an earlier arm (task
        durations, load times) carries over.
    load
        Keyword arguments of :func:`benchmarks.loading.load_model`.
    load_seconds
        Calibrated load time (dask-context's ``load_time`` hint).
    nbytes
        Calibrated size of a loaded model (dask-context's ``memory`` estimate).
    starts
        File the workers log every task start to
        (:class:`benchmarks.tasks.TaskStarts`; None: no log).
    """

    tag: str
    load: dict[str, Any]
    load_seconds: float
    nbytes: int
    starts: str | None = None


class DaskArm:
    """One way of running the pipeline's model tasks on a Dask cluster."""

    name: ClassVar[str]
    grace: float | None = None
    """Seconds from a preemption's warning (SIGTERM) to its kill; None: preemptions
    come without a warning (SIGKILL)."""

    def setup(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> None:
        """Prepare the cluster (before the clock starts)."""

    def task(self, claims: list[str], model: Model, key: str, arm: ArmSetup) -> Delayed:
        """The delayed task that judges ``claims`` with ``model``."""
        raise NotImplementedError

    def teardown(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> dict[str, Any]:
        """Undo :meth:`setup` (after the clock stops); return arm-specific facts."""
        return {}


class LoadPerTask(DaskArm):
    """No context reuse: every task loads its model."""

    name = "load-per-task"

    def task(self, claims: list[str], model: Model, key: str, arm: ArmSetup) -> Delayed:
        return dask.delayed(load_per_task)(claims, model.path, arm.load, dask_key_name=key)


class GlobalCache(DaskArm):
    """The plain-Dask idiom: a module-level lazy cache of one model per worker."""

    name = "global-cache"
    capacity = 1

    def setup(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> None:
        client.run(clear_cache)

    def task(self, claims: list[str], model: Model, key: str, arm: ArmSetup) -> Delayed:
        return dask.delayed(cached_judge)(
            claims, model.path, arm.load, self.capacity, dask_key_name=key
        )

    def teardown(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> dict[str, Any]:
        client.run(clear_cache, on_error="ignore")
        return {}


class DaskContext(DaskArm):
    """dask-context: ContextSpec per model, ``register``, ``use``; tasks call ``verify``."""

    name = "dask-context"

    @staticmethod
    def context(model: Model, arm: ArmSetup) -> str:
        return f"{model.name}-{arm.tag}"

    def spec(self, model: Model, arm: ArmSetup) -> dask_context.ContextSpec:
        """The context of ``model``: loaded as every arm loads it, with size and time hints."""
        return dask_context.ContextSpec(
            self.context(model, arm), load_model, args=[model.path], kwargs=arm.load,
            memory=arm.nbytes, load_time=arm.load_seconds,
        )

    def setup(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> None:
        dask_context.register(client, *(self.spec(m, arm) for m in models))

    def task(self, claims: list[str], model: Model, key: str, arm: ArmSetup) -> Delayed:
        name = self.context(model, arm)
        with dask_context.use(name):
            return dask.delayed(verify)(claims, name, dask_key_name=key)

    def teardown(self, client: Client, models: Sequence[Model], arm: ArmSetup) -> dict[str, Any]:
        names = [self.context(m, arm) for m in models]
        info = dask_context.report(client)["contexts"]
        dask_context.unregister(client, *names)
        keep = ("loads", "tasks", "warmups", "requeued", "evictions", "failures", "load_time")
        return {"router": {n: {k: info[n][k] for k in keep} for n in names if n in info}}


def pipeline(
    arm: DaskArm, batches: Sequence[list[str]], models: Sequence[Model], setup: ArmSetup
) -> list[Delayed]:
    """One result per batch: the model task's verdicts, or the vote of several models."""
    out = []
    for j, batch in enumerate(batches):
        # dask's key_split makes "run3_dask_context" the task prefix of
        # "run3_dask_context-m0-5": one prefix per arm, shared by the models as when
        # one function serves every model of a pipeline, and new in every arm, so that
        # no task duration the scheduler learnt in an earlier arm carries over
        answers = [
            arm.task(batch, m, f"{setup.tag}_{arm.name.replace('-', '_')}-{m.name}-{j}", setup)
            for m in models
        ]
        if len(answers) == 1:
            out.append(answers[0])
        else:
            out.append(dask.delayed(vote)(*answers, dask_key_name=f"{setup.tag}_vote-{j}"))
    return out
