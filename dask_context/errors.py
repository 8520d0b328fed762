"""Exceptions raised by dask-context, each naming the problem it reports."""

from __future__ import annotations

from typing import Any


class ContextError(Exception):
    """Base class of every dask-context error."""


class UnknownContextError(ContextError, LookupError):
    """A task asked for a context that was never registered."""

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(repr(k) for k in self.known) or "none"
        super().__init__(
            f"unknown context {name!r}: registered contexts are {listed}; "
            "register it with dask_context.register(client, ContextSpec(...))"
        )

    def __reduce__(self):
        return type(self), (self.name, self.known)


class DuplicateContextError(ContextError, ValueError):
    """Two specs, or a spec and an already registered context, share a name."""


class ContextTooLargeError(ContextError, ValueError):
    """A context does not fit in a worker's memory budget even when it is alone."""


class ContextCycleError(ContextError, RuntimeError):
    """A context's loader asks for a context whose load it is part of (itself, or a
    context whose loader asks for it)."""


class NotRegisteredError(ContextError, RuntimeError):
    """``get_context`` ran on a worker where dask-context was never set up."""


class WorkerDiedLoadingError(ContextError, RuntimeError):
    """Workers died while loading a context (out of memory, a crash in native code, a
    kill): its tasks fail once ``load-deaths`` workers did since it last loaded and no
    worker holds it."""


class SettingError(ContextError, ValueError):
    """A ``dask-context`` setting has a value that cannot be used."""


def error_payload(exc: BaseException) -> dict[str, Any]:
    """``exc`` and its traceback, pickled the way Dask sends task errors.

    The scheduler fails tasks with this payload (``Scheduler.transition(...,
    "erred", **payload)``), so that ``Future.result()`` raises the loader's own
    exception with its own traceback.
    """
    import traceback

    import tblib.pickling_support
    from distributed.protocol import pickle

    tblib.pickling_support.install(exc)
    try:
        exception = pickle.dumps(exc)
        pickle.loads(exception)
    except Exception:
        exception = pickle.dumps(ContextError(repr(exc)))
    tb = exc.__traceback__
    try:
        tb_bytes = pickle.dumps(tb)
        pickle.loads(tb_bytes)
    except Exception:
        tb_bytes = None
    return {
        "exception": exception,
        "traceback": tb_bytes,
        "exception_text": repr(exc),
        "traceback_text": "".join(traceback.format_tb(tb)),
    }
