"""Factories for ``../shared/conformance/run.sh``: the router as distributed's own
scheduler, stealing, resources and adaptive tests see it.

``.ci/run`` runs that suite three times: the no-op baseline, the bare router, and the
router with a context registered; the three must pass the same tests.
"""

from __future__ import annotations

from dask_context import ContextRouter, ContextSpec


def bare_router() -> ContextRouter:
    """The router with nothing registered."""
    return ContextRouter()


def router_with_context() -> ContextRouter:
    """The router with one context registered (tasks in those tests never ask for it)."""
    return ContextRouter(contexts=[ContextSpec("conformance", dict, kwargs={"x": 1})])
