"""What a context is: a name, how to load it, where to pin it and how big it is.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import cloudpickle
from dask.utils import format_bytes

from dask_context import config
from dask_context.errors import DuplicateContextError, SettingError

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
    files
        A directory the loader reads (model weights on a shared filesystem, say).
        A worker stages it in a node-local directory first (from a warm peer over
        Dask's worker-to-worker comms, from a copy another worker of its node made,
        or from this path when neither has it) and passes the local copy to the
        loader as its first argument. See docs/peer-bootstrap.md.

    Examples
    --------
    >>> spec = ContextSpec("prompts", dict, kwargs={"verify": "Claim: {claim}"},
    ...                    memory="1 MiB")
    >>> spec
    ContextSpec('prompts', loader=dict, device='auto', memory='1.00 MiB')
    >>> spec.token == ContextSpec("prompts", dict, kwargs={"verify": "Claim: {claim}"},
    ...                           memory="1 MiB").token
    True
    >>> spec.token == ContextSpec("prompts", dict, memory="1 MiB").token
    False
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
        files: str | os.PathLike[str] | None = None,
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
        self.load_time = None
        if load_time is not None:
            try:
                self.load_time = config.to_seconds(load_time)
            except ValueError:
                raise ValueError(
                    f"load_time of context {name!r} must be a duration in seconds or "
                    f"like '30s', got {load_time!r}"
                ) from None
            if self.load_time < 0:
                raise ValueError(f"load_time of context {name!r} must be >= 0, got {load_time!r}")
        self.eager = bool(eager)
        self.files = None if files is None else os.fspath(files)
        self._identify()

    def _identify(self) -> None:
        """Compute the spec's identity once, where it is created.

        The digests travel with the spec (see :meth:`__getstate__`): a worker or the
        scheduler never recomputes them, because a function defined in a user's
        script (``__main__``) pickles differently on each side (its annotations,
        globals and module differ once unpickled), and a recomputed token would make
        the router wait for a worker whose spec never matches.
        """
        values = {
            "loader": self.loader, "args": self.args, "kwargs": self.kwargs,
            "device": self.device, "memory": self.memory, "load_time": self.load_time,
            "eager": self.eager, "files": self.files,
        }
        fields = {k: _digest(v) for k, v in values.items()}
        fields["loader"] = _digest(_importable_name(self.loader) or self.loader)
        digest = hashlib.sha1(self.name.encode())
        for key in sorted(fields):
            digest.update(fields[key].encode())
        self.fields: dict[str, str] = fields
        #: identifies the spec: equal tokens mean the same context
        self.token: str = digest.hexdigest()

    def info(self) -> dict[str, Any]:
        """What the scheduler needs to know: plain data, never the loader."""
        return {
            "name": self.name, "token": self.token, "fields": self.fields,
            "memory": self.memory, "load_time": self.load_time, "files": self.files,
        }

    def __repr__(self) -> str:
        loader = getattr(self.loader, "__qualname__", repr(self.loader))
        memory = "unknown" if self.memory is None else format_bytes(self.memory)
        return (
            f"ContextSpec({self.name!r}, loader={loader}, device={self.device!r}, "
            f"memory={memory!r})"
        )


def _digest(value: Any) -> str:
    return hashlib.sha1(cloudpickle.dumps(value)).hexdigest()


def _importable_name(func: Any) -> str | None:
    """``"module:qualname"`` if importing that gives back ``func``, else None.

    Such a function is compared by name (a new version of its module is the same
    context); others (lambdas, functions of a script or notebook) by their code.

    >>> _importable_name(format_bytes)
    'dask.utils:format_bytes'
    >>> _importable_name(lambda: 0) is None
    True
    """
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module}:{qualname}" if found is func else None


def _nonnegative_bytes(name: str, value: int | str) -> int:
    """``memory`` of context ``name`` in bytes; the error names the context and field.

    >>> _nonnegative_bytes("x", "2 GiB")
    2147483648
    >>> _nonnegative_bytes("x", "5 parsecs")
    Traceback (most recent call last):
    ...
    ValueError: memory of context 'x' must be a size in bytes or like '2 GiB', got '5 parsecs'
    >>> _nonnegative_bytes("x", -1)
    Traceback (most recent call last):
    ...
    ValueError: memory of context 'x' must be >= 0, got -1
    """
    try:
        n = config.to_bytes(value)
    except ValueError:
        raise ValueError(
            f"memory of context {name!r} must be a size in bytes or like '2 GiB', got {value!r}"
        ) from None
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


def differences(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Names of the fields whose digests differ between two ``ContextSpec.fields``.

    >>> differences(ContextSpec("a", dict).fields, ContextSpec("a", list, eager=True).fields)
    ['eager', 'loader']
    """
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def from_config(entry: Mapping[str, Any], where: str) -> ContextSpec:
    """A spec from a ``dask-context.contexts`` entry (the loader as ``"module:function"``).

    Parameters
    ----------
    entry
        ``{"name": ..., "loader": "module:function", "args": [...], "kwargs": {...},
        "device": ..., "memory": ..., "load_time": ..., "eager": ..., "files": ...}``.
    where
        The setting's name for error messages, e.g. ``"dask-context.contexts[0]"``.

    Examples
    --------
    >>> from_config({"name": "t", "loader": "builtins:dict", "kwargs": {"a": 1}}, "x")
    ContextSpec('t', loader=dict, device='auto', memory='unknown')
    >>> from_config({"name": "t", "loader": "no_such_module:load"}, "dask-context.contexts[0]")
    Traceback (most recent call last):
    ...
    dask_context.errors.SettingError: dask-context.contexts[0] ('t'): cannot import the loader 'no_such_module:load': No module named 'no_such_module'
    """
    if not isinstance(entry, Mapping):
        raise SettingError(f"{where}: expected a mapping with name and loader, got {entry!r}")
    known = {"name", "loader", "args", "kwargs", "device", "memory", "load_time", "eager", "files"}
    unknown = sorted(set(entry) - known)
    if unknown or "name" not in entry or "loader" not in entry:
        raise SettingError(
            f"{where}: needs 'name' and 'loader' and takes only {sorted(known)}; got {sorted(entry)}"
        )
    name, target = entry["name"], entry["loader"]
    module, _, attr = str(target).partition(":")
    try:
        loader = getattr(importlib.import_module(module), attr) if attr else None
    except (ImportError, AttributeError) as exc:
        raise SettingError(
            f"{where} ({name!r}): cannot import the loader {target!r}: {exc}"
        ) from exc
    if loader is None:
        raise SettingError(f"{where} ({name!r}): loader {target!r} must be 'module:function'")
    try:
        return ContextSpec(
            name, loader, args=entry.get("args", ()), kwargs=entry.get("kwargs"),
            device=entry.get("device", "auto"), memory=entry.get("memory"),
            load_time=entry.get("load_time"), eager=entry.get("eager", False),
            files=entry.get("files"),
        )
    except (TypeError, ValueError) as exc:
        raise SettingError(f"{where} ({name!r}): {exc}") from exc
