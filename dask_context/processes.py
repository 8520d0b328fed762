"""Warm starts: worker processes that begin with torch and transformers imported.

A nanny starts its worker process with ``multiprocessing``'s ``spawn`` by default: a
fresh interpreter that imports everything again. For an LLM worker that is seconds
of CPU (torch, transformers and its modeling code: about 5 CPU-seconds on this
project's test machines, more from a shared filesystem) before the context can even
start loading, paid again by every worker a nanny restarts (a crash, a kill,
``client.restart()``), every worker a ``LocalCluster`` adds, and every replacement of
a preempted worker on the same node, where it competes for the cores of the workers
still running.

:func:`warm_starts` switches nannies to ``forkserver`` and has the fork server import
the modules once: each worker process is then a fork of a process that already
imported them, up in a fraction of a second. The server imports and never computes,
so forking it is safe for torch (no OpenMP pool, no CUDA context exists to inherit);
each worker still initializes CUDA itself, under its own ``CUDA_VISIBLE_DEVICES``.

Call it before the first nanny starts (before ``LocalCluster(...)``), or set
``dask-context.processes.warm-starts: true`` and start ``dask worker`` with
``--preload-nanny dask_context``.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
from collections.abc import Iterable

import dask.config

from dask_context import _compat, config
from dask_context.errors import SettingError

logger = logging.getLogger(__name__)

METHOD_KEY = "distributed.worker.multiprocessing-method"


def importable(modules: Iterable[str]) -> list[str]:
    """The names among ``modules`` that can be imported here (without importing them).

    >>> importable(["json", "no_such_module_here", "json.decoder"])
    ['json', 'json.decoder']
    """
    return [m for m in modules if _find(m)]


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a submodule of a missing package
        return False


def warm_starts(modules: Iterable[str] | None = None) -> list[str]:
    """Start nannies' worker processes from now on by forking a server that imported ``modules``.

    Sets ``distributed.worker.multiprocessing-method`` to ``forkserver`` in
    ``dask.config`` (for this process and the nannies it starts) and adds
    ``modules`` to what the fork server imports when it starts.

    Parameters
    ----------
    modules
        Modules to import once in the fork server. Default: the setting
        ``dask-context.processes.preload`` (torch, transformers and its
        ``modeling_utils``, which transformers itself imports only when a model
        is loaded), those of them that are installed.

    Returns
    -------
    Every module the fork server imports (distributed's own list and ``modules``).

    Raises
    ------
    SettingError
        If ``dask-context.processes.preload`` is not a list of module names.
    ValueError
        If a module given in ``modules`` cannot be found, or this platform has no
        ``forkserver`` (Windows).

    Notes
    -----
    The fork server starts with the first worker process and keeps the list it
    started with: once it runs, a new list applies only in a new Python process (a
    warning says so). Environment variables that must be set before a process
    starts (``distributed.nanny.pre-spawn-environ``) are those of the first start.

    Examples
    --------
    .. code-block:: python

        import dask_context
        from distributed import Client, LocalCluster

        if __name__ == "__main__":
            dask_context.warm_starts()  # before the cluster
            client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        raise ValueError("warm starts need multiprocessing's forkserver, which this platform lacks")
    if modules is None:
        setting = config.get("processes.preload")
        if not isinstance(setting, list) or not all(isinstance(m, str) for m in setting):
            raise SettingError(
                f"dask-context.processes.preload must be a list of module names, got {setting!r}"
            )
        wanted = importable(setting)
    else:
        wanted = list(modules)
        missing = [m for m in wanted if not _find(m)]
        if missing:
            raise ValueError(f"cannot warm-start workers with {missing}: no such module here")
    dask.config.set({METHOD_KEY: "forkserver"})
    # let distributed set its own preload list first, then extend it
    context = _compat.nanny_mp_context()
    preload = _compat.forkserver_preload()
    if _compat.forkserver_running():
        late = [m for m in wanted if m not in preload]
        if late:
            logger.warning(
                "The fork server of this process runs already: worker processes start "
                "without %s imported until Python restarts. Call warm_starts() before "
                "the first cluster starts.", late,
            )
        return preload
    preload += [m for m in wanted if m not in preload]
    context.set_forkserver_preload(preload)
    logger.info("Worker processes start from a fork server that imported %s", preload)
    return preload
