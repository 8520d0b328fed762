"""Set up dask-context in an existing deployment, with no code on the client.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.

``dask scheduler --preload dask_context`` and ``dask worker --preload dask_context``
(or dask-jobqueue's ``job_extra_directives``/``worker_extra_args=["--preload",
"dask_context"]``) call :func:`dask_setup` in each process: the scheduler gets the
router, each worker the contexts declared in the ``dask-context.contexts`` setting.
Any client can then ``use("name")`` without calling ``register``. ``dask worker
--preload-nanny dask_context`` with ``dask-context.processes.warm-starts: true``
starts worker processes warm (:mod:`dask_context.processes`). A malformed entry
or a loader that cannot be imported stops the process at start (``SystemExit``), with
an error that names the setting and the module.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


async def dask_setup(server: Any) -> None:
    """Preload hook: the router on a scheduler, declared contexts on a worker.

    Parameters
    ----------
    server
        The ``Scheduler``, ``Worker`` or ``Nanny`` being started (``--preload-nanny
        dask_context``: warm starts if ``dask-context.processes.warm-starts`` is set).
    """
    from distributed import Nanny, Scheduler, Worker

    from dask_context import config
    from dask_context.errors import SettingError
    from dask_context.processes import warm_starts
    from dask_context.scheduler import ContextRouter, declared_specs
    from dask_context.worker import ContextPlugin

    try:
        specs = declared_specs()
        if isinstance(server, Worker):
            config.check_worker(config.worker_settings())
    except SettingError as exc:
        # distributed logs and ignores exceptions from preloads; a bad declaration
        # must stop the process at start instead of failing tasks later
        raise SystemExit(f"dask-context: {exc}") from exc
    if isinstance(server, Scheduler):
        await server.register_scheduler_plugin(ContextRouter(), idempotent=True)
        logger.info("dask-context router set up; declared contexts: %s", [s.name for s in specs])
    elif isinstance(server, Worker):
        for spec in specs:
            await server.plugin_add(ContextPlugin(spec))
    elif isinstance(server, Nanny) and config.get("processes.warm-starts"):
        # a nanny's preloads run before it starts its worker process
        try:
            warm_starts()
        except (SettingError, ValueError) as exc:
            raise SystemExit(f"dask-context: {exc}") from exc
