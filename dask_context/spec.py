"""What a context is: a name, how to load it, where to pin it and how big it is."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dask.utils import format_bytes, parse_bytes, parse_timedelta

from dask_context.errors import DuplicateContextError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class ContextSpec:
    """A named context that workers load once and keep for many tasks.

    Parameters
    ----------
    name
        The name tasks ask for, with ``get_context(name)`` and ``use(name)``.
    loader
        Any callable returning the context object: a model, a ``(model, tokenizer)``
        pair, a dict of prompt templates... It is called on the worker as
        ``loader(*args, **kwargs)``, with ``device="cuda:0"`` (or ``"cpu"``) added
        when its signature has a ``device`` parameter. It must be picklable (a
        module-level function, or a lambda, which Dask pickles with cloudpickle).
    args, kwargs
        Arguments for ``loader``, e.g. a local model directory.
    device
        ``"auto"`` (the worker's setting ``dask-context.worker.device``), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"``. torch modules and tensors in the loaded object
        are moved there.
    memory
        Estimated size of the loaded context, in bytes or as a string (``"2 GiB"``).
        Routing uses it before the first load; afterwards the measured size wins.
    load_time
        Estimated load time (seconds or ``"30s"``), used by routing until a load has
        been measured.
    eager
        Load on every worker as soon as the worker plugin is set up, instead of on
        first use. Eager loads run in a background thread, never on the event loop.

    Examples
    --------
    >>> spec = ContextSpec("prompts", dict, kwargs={"verify": "Claim: {claim}"},
    ...                    memory="1 MiB")
    >>> spec
    ContextSpec('prompts', loader=dict, device='auto', memory='1.00 MiB')
    >>> ContextSpec("bad", loader="not a function")
    Traceback (most recent call last):
    ...
    TypeError: loader of context 'bad' is not callable: got 'not a function' (str)
    """

    def __init__(
        self,
        name: str,
        loader: Callable[..., Any],
        *,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        device: str = "auto",
        memory: int | str | None = None,
        load_time: float | str | None = None,
        eager: bool = False,
    ):
        if not isinstance(name, str) or not name:
            raise ValueError(f"context name must be a non-empty string, got {name!r}")
        if not callable(loader):
            raise TypeError(
                f"loader of context {name!r} is not callable: "
                f"got {loader!r} ({type(loader).__name__})"
            )
        if not isinstance(device, str) or not _DEVICE.match(device):
            raise ValueError(
                f"device of context {name!r} must be 'auto', 'cpu', 'cuda' or "
                f"'cuda:N', got {device!r}"
            )
        self.name = name
        self.loader = loader
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.device = device
        self.memory = None if memory is None else _nonnegative_bytes(name, memory)
        self.load_time = None if load_time is None else parse_timedelta(load_time)
        self.eager = bool(eager)

    def info(self) -> dict[str, Any]:
        """What the scheduler needs to know: plain data, never the loader."""
        return {"name": self.name, "memory": self.memory, "load_time": self.load_time}

    def __repr__(self) -> str:
        loader = getattr(self.loader, "__qualname__", repr(self.loader))
        memory = "unknown" if self.memory is None else format_bytes(self.memory)
        return (
            f"ContextSpec({self.name!r}, loader={loader}, device={self.device!r}, "
            f"memory={memory!r})"
        )


def _nonnegative_bytes(name: str, value: int | str) -> int:
    n = parse_bytes(value) if isinstance(value, str) else int(value)
    if n < 0:
        raise ValueError(f"memory of context {name!r} must be >= 0, got {value!r}")
    return n


def check_unique(specs: Iterable[ContextSpec], known: Iterable[str] = ()) -> None:
    """Raise if two specs, or a spec and an already known context, share a name.

    Examples
    --------
    >>> a = ContextSpec("a", dict)
    >>> check_unique([a, ContextSpec("b", dict)])
    >>> check_unique([a, ContextSpec("a", list)])
    Traceback (most recent call last):
    ...
    dask_context.errors.DuplicateContextError: context 'a' is given twice
    >>> check_unique([a], known=["a"])
    Traceback (most recent call last):
    ...
    dask_context.errors.DuplicateContextError: context 'a' is already registered
    """
    seen = set(known)
    given: set[str] = set()
    for spec in specs:
        if not isinstance(spec, ContextSpec):
            raise TypeError(f"expected a ContextSpec, got {spec!r}")
        if spec.name in given:
            raise DuplicateContextError(f"context {spec.name!r} is given twice")
        if spec.name in seen:
            raise DuplicateContextError(f"context {spec.name!r} is already registered")
        given.add(spec.name)
