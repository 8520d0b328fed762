"""dask-context: load a model (or any costly context) once per Dask worker, keep it,
and send the tasks that need it to the workers that hold it."""

from dask_context import config  # noqa: F401  (merges the YAML defaults into dask.config)
from dask_context.adaptive import ContextAdaptive
from dask_context.api import delayed, register, report, unregister, use
from dask_context.cache import ContextCache
from dask_context.deploy import dask_setup
from dask_context.errors import (
    ContextError,
    ContextTooLargeError,
    DuplicateContextError,
    NotRegisteredError,
    UnknownContextError,
)
from dask_context.scheduler import ContextRouter
from dask_context.spec import ContextSpec
from dask_context.worker import ContextPlugin, get_context

__version__ = "0.1.0"

__all__ = [
    "ContextAdaptive",
    "ContextCache",
    "ContextError",
    "ContextPlugin",
    "ContextRouter",
    "ContextSpec",
    "ContextTooLargeError",
    "DuplicateContextError",
    "NotRegisteredError",
    "UnknownContextError",
    "dask_setup",
    "delayed",
    "get_context",
    "register",
    "report",
    "unregister",
    "use",
]
