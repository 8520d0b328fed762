"""Prometheus metrics for contexts, served on the scheduler's ``/metrics``.

distributed serves every collector in ``prometheus_client``'s global registry on the
scheduler's ``/metrics`` page, next to its own ``dask_scheduler_*`` metrics. The
router registers one collector when it starts and removes it when it closes. Names
follow distributed's scheme (``<namespace>_context_<name>``, namespace ``dask`` by
default), e.g. ``dask_context_loads_total{context="verifier"}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from distributed.http.prometheus import PrometheusCollector

if TYPE_CHECKING:
    from dask_context.scheduler import ContextRouter

logger = logging.getLogger(__name__)


class ContextCollector(PrometheusCollector):
    """Reads a :class:`~dask_context.scheduler.ContextRouter`'s state on each scrape."""

    def __init__(self, router: ContextRouter):
        super().__init__(router.scheduler)
        self.router = router
        self.subsystem = "context"

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        report = self.router.report()["contexts"]
        counters = [
            ("loads", "Context loads on workers.", "loads"),
            ("load_seconds", "Seconds spent loading contexts.", "load_seconds"),
            ("evictions", "Contexts evicted from workers.", "evictions"),
            ("load_failures", "Context loads that raised.", "failures"),
            ("tasks", "Context tasks finished.", "tasks"),
            ("warmups", "Cold workers chosen to warm up for a context.", "warmups"),
            ("requeued", "Context tasks sent back to the queue (worker lost).", "requeued"),
        ]
        for name, doc, field in counters:
            family = CounterMetricFamily(self.build_name(name), doc, labels=["context"])
            for context, row in report.items():
                family.add_metric([context], row[field])
            yield family
        gauges = [
            ("queued_tasks", "Context tasks waiting for a worker.", "queued"),
            ("warm_workers", "Workers holding the context.", "warm"),
            ("load_time_seconds", "Estimated load time of the context.", "load_time"),
        ]
        for name, doc, field in gauges:
            family = GaugeMetricFamily(self.build_name(name), doc, labels=["context"])
            for context, row in report.items():
                value = row[field]
                if isinstance(value, list):
                    value = len(value)
                family.add_metric([context], float("nan") if value is None else value)
            yield family


def register_collector(router: ContextRouter) -> ContextCollector | None:
    """Add the router's collector to the global registry (None without prometheus_client)."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        logger.info("prometheus_client is not installed: no dask-context metrics")
        return None
    collector = ContextCollector(router)
    try:
        REGISTRY.register(collector)
    except ValueError:
        # another scheduler in this process (tests) already serves these names
        logger.warning("dask-context metrics are already registered in this process")
        return None
    return collector


def unregister_collector(collector: ContextCollector | None) -> None:
    if collector is None:
        return
    from prometheus_client import REGISTRY

    REGISTRY.unregister(collector)
