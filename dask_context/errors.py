"""Exceptions raised by dask-context, each naming the problem it reports."""

from __future__ import annotations


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


class NotRegisteredError(ContextError, RuntimeError):
    """``get_context`` ran on a worker where dask-context was never set up."""
