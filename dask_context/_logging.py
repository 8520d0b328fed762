"""dask-context's log lines, formatted like distributed's.

distributed configures its loggers once, when it is imported, from Dask's
``logging`` settings: with the usual ("old-style") settings, each logger named
there gets a level and a handler to stderr with ``distributed.admin.log-format``
(time, logger, level, message). A logger named ``dask_context`` in those settings
is configured the same way already; :func:`setup` gives the ``dask_context``
loggers distributed's handler when nothing else configured them, so that their
lines look like the scheduler's and the workers' next to them.
"""

from __future__ import annotations

import logging

import dask.config

NAME = "dask_context"
# the level when Dask's settings name none: warnings and errors, as distributed's
# own loggers show in the processes of a LocalCluster (silence_logs)
DEFAULT_LEVEL = logging.WARNING


def setup() -> None:
    """Give the ``dask_context`` loggers distributed's handler and format.

    Leaves logging alone where it is configured elsewhere: the ``dask_context``
    logger already has a handler (from Dask's ``logging`` settings, or the
    application's), the root logger has one (the application's ``basicConfig``:
    our lines propagate to it), or Dask's logging settings are a ``dictConfig``
    schema or a file (distributed attaches no handler of its own then). Idempotent.
    """
    logger = logging.getLogger(NAME)
    if logger.handlers or logging.getLogger().handlers or _configured_elsewhere():
        return
    handler = _distributed_handler()
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(dask.config.get("distributed.admin.log-format")))
    if logger.level == logging.NOTSET:
        logger.setLevel(DEFAULT_LEVEL)
    logger.addHandler(handler)
    # as distributed's loggers: one line per record even if the root gets a handler later
    logger.propagate = False


def _configured_elsewhere() -> bool:
    config = dask.config.config
    settings = config.get("distributed", {})
    if not ({"logging", "logging-file-config"} & settings.keys()):
        settings = config
    if "logging-file-config" in settings:
        return True
    levels = settings.get("logging") or {}
    return "version" in levels or NAME in levels


def _distributed_handler() -> logging.Handler | None:
    for handler in logging.getLogger("distributed").handlers:
        if isinstance(handler, logging.StreamHandler):
            return handler
    return None
