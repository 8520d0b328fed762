"""The user API: register contexts on a cluster, mark tasks that need them."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import dask
from distributed import Client

from dask_context.scheduler import ContextRouter
from dask_context.spec import ContextSpec, check_unique
from dask_context.worker import ContextPlugin


def register(client: Client, *specs: ContextSpec, replace: bool = False) -> Any:
    """Make contexts available on a cluster, on current and future workers.

    Registers the scheduler plugin (once per cluster; registering again is a no-op)
    and one worker plugin per context. Works with existing deployments: nothing but
    ``dask-context`` being installed on the scheduler and the workers is needed.

    Parameters
    ----------
    client
        A client of the cluster (an asynchronous one returns an awaitable).
    *specs
        The contexts.
    replace
        Replace contexts already registered under the same names.

    Returns
    -------
    The names of all contexts registered on the cluster.

    Raises
    ------
    DuplicateContextError
        If two specs share a name, or a name is already registered and ``replace``
        is false.

    Examples
    --------
    .. code-block:: python

        spec = ContextSpec("verifier", load_causal_lm, args=["/models/tiny"])
        register(client, spec)  # ['verifier']
    """
    check_unique(specs)
    return client.sync(_register, client, specs, replace)


async def _register(client: Client, specs: tuple[ContextSpec, ...], replace: bool) -> list[str]:
    await client.register_plugin(ContextRouter())
    names = await client.scheduler.dask_context_register(
        specs=[spec.info() for spec in specs], replace=replace
    )
    for spec in specs:
        await client.register_plugin(ContextPlugin(spec))
    return names


def unregister(client: Client, *names: str) -> Any:
    """Remove contexts from every worker (their memory is freed)."""
    return client.sync(_unregister, client, names)


async def _unregister(client: Client, names: tuple[str, ...]) -> None:
    for name in names:
        await client.unregister_worker_plugin(f"dask-context-{name}")


def report(client: Client) -> Any:
    """Per-context and per-worker state: loads, load times, evictions, warm workers.

    Returns
    -------
    ``{"contexts": {name: {...}}, "workers": {address: {...}}}``, plain data.
    """
    return client.sync(client.scheduler.dask_context_report)


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Mark the tasks submitted inside this block as needing context ``name``.

    Works for everything submitted or computed in the block: ``bag.compute()``,
    ``client.compute``/``persist``, ``client.map``/``submit``, and ``dask.delayed``
    graphs built in the block. Tasks marked this way run only on workers that hold
    the context (or that the scheduler chose to warm).

    dask.bag rewrites its graph when it computes and drops annotations made while
    the bag was built, so for bags put ``use`` around the ``compute`` call.

    Examples
    --------
    .. code-block:: python

        with use("verifier"):
            verdicts = claims.map_partitions(verify).compute()
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"context name must be a non-empty string, got {name!r}")
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
