"""dask-context: load a model (or any costly context) once per Dask worker, keep it,
and send the tasks that need it to the workers that hold it."""

import multiprocessing

from dask_context import (
    _logging,
    config,  # noqa: F401  (merges the YAML defaults into dask.config)
    dashboard,
)
from dask_context.adaptive import ContextAdaptive
from dask_context.api import delayed, register, report, unregister, use
from dask_context.cache import ContextCache as ContextCache  # importable, not API
from dask_context.deploy import dask_setup as dask_setup  # --preload looks it up
from dask_context.errors import (
    ContextCycleError,
    ContextError,
    ContextTooLargeError,
    DuplicateContextError,
    NotRegisteredError,
    UnknownContextError,
    WorkerDiedLoadingError,
)
from dask_context.preemption import drain as drain
from dask_context.preemption import request_drain as request_drain
from dask_context.processes import warm_starts
from dask_context.resume import CorruptPartitionError, resumable
from dask_context.scheduler import ContextRouter
from dask_context.spec import ContextSpec
from dask_context.worker import ContextPlugin, get_context

__version__ = "0.1.0"

_logging.setup()

if multiprocessing.current_process().name == "MainProcess":
    # the Contexts page on the dashboard of every scheduler this process starts from
    # now on (a LocalCluster's, `dask scheduler --preload dask_context`'s); worker
    # processes started by a nanny serve no dashboard and skip importing bokeh
    dashboard.install()

# The public API: what users import from here. ContextRouter and ContextPlugin are
# for registering by hand (client.register_plugin); the loaders are in
# dask_context.models, drain and request_drain in dask_context.preemption. The other
# names imported above stay importable (dask_setup is what --preload looks up) but
# are not API; see docs/design.md for which modules are.
__all__ = [
    "ContextAdaptive",
    "ContextCycleError",
    "ContextError",
    "ContextPlugin",
    "ContextRouter",
    "ContextSpec",
    "ContextTooLargeError",
    "CorruptPartitionError",
    "DuplicateContextError",
    "NotRegisteredError",
    "UnknownContextError",
    "WorkerDiedLoadingError",
    "delayed",
    "get_context",
    "register",
    "report",
    "resumable",
    "unregister",
    "use",
    "warm_starts",
]
