"""The user API: register contexts on a cluster, mark tasks that need them, report.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.
"""

from __future__ import annotations

import contextlib
import functools
import html
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import dask
from dask.utils import format_bytes, format_time
from distributed import Client

from dask_context import config, graph, preemption
from dask_context._protocol import plugin_name
from dask_context.errors import DuplicateContextError, UnknownContextError
from dask_context.scheduler import WARNINGS, ContextRouter
from dask_context.spec import ContextSpec, check_unique
from dask_context.worker import ContextPlugin, router_present

logger = logging.getLogger(__name__)


def register(client: Client, *specs: ContextSpec, replace: bool = False) -> Any:
    """Make contexts available on a cluster, on current and future workers.

    Registers the scheduler plugin (once per cluster; registering again is a no-op)
    and one worker plugin per context. Works with existing deployments: nothing but
    ``dask-context`` being installed on the scheduler and the workers is needed.
    Registering a spec identical to the registered one (same name, loader,
    arguments and settings) does nothing and keeps every warm copy, so scripts and
    notebook cells can be run again, by several clients at once.

    Parameters
    ----------
    client
        A client of the cluster (an asynchronous one returns an awaitable).
    *specs
        The contexts.
    replace
        Replace contexts registered under the same names with different specs;
        their warm copies are dropped and they load again on first use.

    Returns
    -------
    ``{name: "added" | "unchanged" | "declared" | "replaced"}`` ("declared": the
    identical context is declared in the cluster's configuration).

    Raises
    ------
    DuplicateContextError
        If two specs share a name, or a different spec is registered under a name
        and ``replace`` is false (the message says which fields differ).

    Examples
    --------
    .. code-block:: python

        spec = ContextSpec("verifier", load_causal_lm, args=["/models/tiny"])
        register(client, spec)  # {'verifier': 'added'}
        register(client, spec)  # {'verifier': 'unchanged'}: nothing reloads
    """
    check_unique(specs)
    return client.sync(_register, client, specs, replace)


async def _register(client: Client, specs: tuple[ContextSpec, ...], replace: bool) -> dict[str, str]:
    await client.register_plugin(ContextRouter())
    status = await client.scheduler.dask_context_register(
        specs=[spec.info() for spec in specs], replace=replace
    )
    if "error" in status:
        raise DuplicateContextError(status["error"])
    for spec in specs:
        if status[spec.name] == "declared":
            continue  # the workers' preload sets it up
        # an unchanged spec keeps its worker plugin (and the warm copies); registering
        # it idempotently still installs it if the client that added it went away
        await client.register_plugin(ContextPlugin(spec, idempotent=status[spec.name] == "unchanged"))
    if config.get("preemption.enabled") and not await client.scheduler.get_metadata(
        keys=preemption.METADATA, default=None
    ):
        await preemption.enable_async(client, config.get_seconds("preemption.grace"),
                                 tuple(config.get("preemption.signals")))
    return status


def unregister(client: Client, *names: str) -> Any:
    """Remove contexts from the cluster: the scheduler forgets them, every worker
    frees their memory, and their queued tasks fail with ``UnknownContextError``.

    Raises
    ------
    UnknownContextError
        If a name is not registered.
    """
    return client.sync(_unregister, client, names)


async def _unregister(client: Client, names: tuple[str, ...]) -> list[str]:
    if not await router_present(client.scheduler):  # nothing was ever registered here
        raise UnknownContextError(names[0], [])
    left = await client.scheduler.dask_context_unregister(names=list(names))
    for name in names:
        try:
            await client.unregister_worker_plugin(plugin_name(name))
        except OSError:
            # a worker died during the broadcast; the scheduler has dropped the
            # plugin already, so no worker (nor any replacement) sets it up again
            logger.info("A worker left while context %r was removed from the workers", name)
    return left


def show_warnings(client: Client) -> None:
    """Show all of the router's advice to users (e.g. tasks that should be marked) as
    Python warnings on this client, whoever submitted the tasks concerned. Without
    it, each piece of advice shows on the clients that submitted those tasks."""

    def warn(event: tuple[float, dict[str, Any]]) -> None:
        warnings.warn(event[1]["message"], UserWarning, stacklevel=1)

    client.subscribe_topic(WARNINGS, warn)


class Report(dict):
    """The plain-data report, with a short rendering for terminals and notebooks."""

    def __str__(self) -> str:
        lines = []
        for name, c in self["contexts"].items():
            load = "-" if c["load_time"] is None else format_time(c["load_time"])
            size = "-" if c["nbytes"] is None else format_bytes(c["nbytes"])
            lines.append(
                f"{name}: {len(c['warm'])} warm, {c['loads']} loads (~{load} each, {size}), "
                f"{c['tasks']} tasks done ({c['hits']} warm hits), {c['queued']} queued, "
                f"{c['running']} running, {c['evictions']} evictions, {c['failures']} failed loads"
            )
        for address, w in self["workers"].items():
            held = ", ".join(f"{n} ({format_bytes(b)})" for n, b in w["resident"].items()) or "nothing"
            budget = "unlimited" if w["budget"] in (None, float("inf")) else format_bytes(int(w["budget"]))
            lines.append(f"  {address}: {held} of {budget}")
        return "\n".join(lines) or "no contexts registered"

    def _repr_html_(self) -> str:
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                name, len(c["warm"]), c["loads"], c["tasks"], c["hits"], c["queued"],
                c["running"], c["evictions"], c["failures"])) + "</tr>"
            for name, c in self["contexts"].items()
        )
        head = "".join(f"<th>{h}</th>" for h in (
            "context", "warm workers", "loads", "tasks", "warm hits", "queued", "running",
            "evictions", "failed loads"))
        return f"<table><tr>{head}</tr>{rows}</table>"


def report(client: Client) -> Any:
    """Per-context and per-worker state: loads, load times, evictions, warm workers.

    Returns
    -------
    ``{"contexts": {name: {...}}, "workers": {address: {...}}}``, plain data whose
    ``str()`` (and notebook rendering) is a short summary.
    """
    return client.sync(_report, client)


async def _report(client: Client) -> Report:
    return Report(await client.scheduler.dask_context_report())


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Mark the tasks built or submitted inside this block as needing context ``name``.

    Works wherever the tasks are computed: a bag, array or ``dask.delayed`` graph
    built in the block is routed when it is computed later, outside it; and
    ``compute``, ``persist``, ``client.map``/``submit`` called in the block mark
    everything they submit. Only tasks that run user code are routed (those that
    call ``get_context``); Dask's own steps (a bag's aggregate, aliases, finalize)
    schedule as usual.

    Examples
    --------
    .. code-block:: python

        with use("verifier"):
            verdicts = claims.map_partitions(verify)
        verdicts.compute()
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"context name must be a non-empty string, got {name!r}")
    graph.install()
    with dask.annotate(context=name):
        yield


def delayed(context: str, **delayed_kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: like ``dask.delayed``, with every call marked as needing ``context``.

    Examples
    --------
    >>> @delayed("verifier")
    ... def verify(claims):
    ...     return [len(c) for c in claims]
    >>> task = verify(["a claim"])
    >>> task.dask.layers[task.key].annotations
    {'context': 'verifier'}
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        lazy = dask.delayed(func, **delayed_kwargs)

        @functools.wraps(func)
        def build(*args: Any, **kwargs: Any) -> Any:
            with use(context):
                return lazy(*args, **kwargs)

        return build

    return decorate
