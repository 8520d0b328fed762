"""The router's report: a plain-data summary of every context and worker.

It is what clients get from :func:`dask_context.report` (the
``dask_context_report`` handler), and what the dashboard page and the metrics
collector read (through :class:`dask_context._observers.RouterView`).
"""

from __future__ import annotations

from typing import Any

from dask_context._router_base import RouterBase


class ReportMixin(RouterBase):
    """The report. Owns no state: it reads ``state``."""

    def report(self) -> dict[str, Any]:
        """Scheduler handler: plain-data summary of every context and worker."""
        st = self.state
        contexts = {}
        for name in sorted(st.contexts):
            c = st.contexts[name]
            contexts[name] = {
                "loads": c.loads,
                "rewarms": c.rewarms,
                "load_seconds": c.load_seconds,
                "load_time": c.load_time,
                "nbytes": c.nbytes,
                "memory": c.memory,
                "evictions": c.evictions,
                "failures": c.failures,
                "deaths": c.deaths,
                "tasks": c.tasks,
                "hits": c.hits,
                "warmups": c.warmups,
                "requeued": c.requeued,
                "queued": c.waiting,
                "running": sum(w.inflight(name) for w in st.workers.values()),
                "warm": sorted(a for a, w in st.workers.items() if name in w.resident),
                "loading": sorted(a for a, w in st.workers.items() if name in w.loading),
                "allowed": sorted(c.allowed),
                "failed_on": sorted(c.failed_on),
                "error": c.error["exception_text"] if c.error else None,
            }
        workers = {
            a: {
                "budget": w.budget,
                "resident": dict(w.resident),
                "host": dict(w.host),
                "loading": sorted(w.loading),
                "inflight": w.inflight(),
                "job": w.job,
                "draining": w.draining,
            }
            for a, w in sorted(st.workers.items())
        }
        return {"contexts": contexts, "workers": workers}
