"""Prometheus metrics for contexts, served on the scheduler's ``/metrics``.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.

distributed serves every collector in ``prometheus_client``'s global registry on the
scheduler's ``/metrics`` page, next to its own ``dask_scheduler_*`` metrics. The
router registers one collector when it starts (once, however often it is started)
and removes it when it closes. Names
follow distributed's scheme (``<namespace>_context_<name>``, namespace ``dask`` by
default), e.g. ``dask_context_loads_total{context="verifier"}``; those a Ray Serve
model-multiplexing user looks for have parallel names (see ``docs/metrics.md``).
Every value is read from the router's state at scrape time, so a worker that left
takes its series with it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from distributed.http.prometheus import PrometheusCollector

from dask_context.state import LATENCY_BUCKETS

if TYPE_CHECKING:
    from dask_context._observers import RouterView

logger = logging.getLogger(__name__)

#: counters per context: (metric name without ``_total``, help, report() field)
COUNTERS = (
    ("loads", "Context loads on workers.", "loads"),
    ("load_seconds", "Seconds spent loading contexts.", "load_seconds"),
    ("evictions", "Contexts evicted (unloaded) from workers.", "evictions"),
    ("load_failures", "Context loads that raised.", "failures"),
    ("tasks", "Context tasks finished.", "tasks"),
    ("hits", "Context tasks that found their context warm on their worker.", "hits"),
    ("warmups", "Cold workers chosen to warm up for a context.", "warmups"),
    ("requeued", "Context tasks sent back to the queue (worker lost).", "requeued"),
)

#: gauges per context: (metric name, help, report() field; a list counts its items)
GAUGES = (
    ("queued_tasks", "Context tasks waiting for a worker.", "queued"),
    ("running_tasks", "Context tasks sent to workers and not finished.", "running"),
    ("warm_workers", "Workers holding the context.", "warm"),
    ("loading_workers", "Workers loading the context now.", "loading"),
    ("load_time_seconds", "Estimated load time of the context.", "load_time"),
)


def cumulative(counts: Sequence[int]) -> list[tuple[str, int]]:
    """Prometheus ``le`` buckets from per-bucket counts over :data:`LATENCY_BUCKETS`.

    >>> cumulative([1, 0, 2] + [0] * (len(LATENCY_BUCKETS) - 4) + [1])[:3]
    [('0.01', 1), ('0.05', 1), ('0.1', 3)]
    >>> cumulative([0] * (len(LATENCY_BUCKETS) - 1) + [1])[-1]
    ('+Inf', 1)
    """
    from prometheus_client.utils import floatToGoString

    return [
        (floatToGoString(le), total)
        for le, total in zip(LATENCY_BUCKETS, itertools.accumulate(counts), strict=True)
    ]


class ContextCollector(PrometheusCollector):
    """Reads a :class:`~dask_context.scheduler.ContextRouter`'s state on each scrape."""

    def __init__(self, router: RouterView):
        super().__init__(router.scheduler)
        self.router = router
        self.subsystem = "context"

    def collect(self) -> Iterator[Any]:
        report = self.router.report()
        yield from self._per_context(report["contexts"])
        yield from self._latencies()
        yield from self._per_worker(report["workers"])

    def _per_context(self, contexts: dict[str, dict[str, Any]]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, doc, field in COUNTERS:
            family = CounterMetricFamily(self.build_name(name), doc, labels=["context"])
            for context, row in contexts.items():
                family.add_metric([context], row[field])
            yield family
        for name, doc, field in GAUGES:
            family = GaugeMetricFamily(self.build_name(name), doc, labels=["context"])
            for context, row in contexts.items():
                value = row[field]
                if isinstance(value, list):
                    value = len(value)
                family.add_metric([context], float("nan") if value is None else value)
            yield family

    def _latencies(self) -> Iterator[Any]:
        """Load and unload latency histograms; ``_count`` equals ``loads_total`` and
        ``evictions_total``, ``_sum`` the seconds spent."""
        from prometheus_client.core import HistogramMetricFamily

        # report() carries no buckets: the records are read directly
        records = self.router.state.contexts
        load = HistogramMetricFamily(
            self.build_name("load_latency_seconds"),
            "Seconds a worker took to load a context.", labels=["context"],
        )
        unload = HistogramMetricFamily(
            self.build_name("unload_latency_seconds"),
            "Seconds a worker took to unload (evict) a context.", labels=["context"],
        )
        for context in sorted(records):
            c = records[context]
            load.add_metric([context], cumulative(c.load_buckets), c.load_seconds)
            unload.add_metric([context], cumulative(c.unload_buckets), c.unload_seconds)
        yield load
        yield unload

    def _per_worker(self, workers: dict[str, dict[str, Any]]) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        count = GaugeMetricFamily(
            self.build_name("resident_contexts"), "Contexts held in memory by a worker.",
            labels=["worker"],
        )
        held = GaugeMetricFamily(
            self.build_name("resident_bytes"), "Bytes of a context held by a worker.",
            labels=["worker", "context"],
        )
        budget = GaugeMetricFamily(
            self.build_name("budget_bytes"),
            "A worker's memory budget for contexts (+Inf: unlimited).", labels=["worker"],
        )
        inflight = GaugeMetricFamily(
            self.build_name("worker_running_tasks"),
            "Context tasks sent to a worker and not finished.", labels=["worker"],
        )
        for worker, row in workers.items():
            count.add_metric([worker], len(row["resident"]))
            for context, nbytes in row["resident"].items():
                held.add_metric([worker, context], nbytes)
            if row["budget"] is not None:  # unknown until the worker's plugins announce it
                budget.add_metric([worker], row["budget"])
            inflight.add_metric([worker], row["inflight"])
        yield from (count, held, budget, inflight)


#: the collector registered for each running router, by ``id(router)``
_REGISTERED: dict[int, ContextCollector] = {}


def register_collector(router: RouterView) -> ContextCollector | None:
    """Add the router's collector to the global registry (None without prometheus_client).

    Registering again for the same router returns its collector: a router that
    ``dask scheduler --preload dask_context`` registers is started twice, once by
    the preload and once by the scheduler's start, which starts every plugin it
    holds by then.
    """
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        logger.info("prometheus_client is not installed: no dask-context metrics")
        return None
    registered = _REGISTERED.get(id(router))
    if registered is not None and registered.router is router:
        return registered
    collector = ContextCollector(router)
    try:
        REGISTRY.register(collector)
    except ValueError:
        # another scheduler in this process (tests) already serves these names
        logger.warning(
            "dask-context metrics are already registered in this process, by the "
            "router of another scheduler: this scheduler's /metrics lacks them"
        )
        return None
    _REGISTERED[id(router)] = collector
    return collector


def unregister_collector(collector: ContextCollector | None) -> None:
    """Remove a collector added by :func:`register_collector` (None: nothing to do)."""
    if collector is None:
        return
    from prometheus_client import REGISTRY

    if _REGISTERED.get(id(collector.router)) is collector:
        del _REGISTERED[id(collector.router)]
    try:
        REGISTRY.unregister(collector)
    except KeyError:
        pass  # removed already: a router closed twice
