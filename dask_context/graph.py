"""Keep ``use()`` marks through Dask's low-level graph optimisation.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.

A bag or array built inside ``dask_context.use(name)`` carries the annotation
``context=name`` on the graph layers built there. When it is computed, Dask's
low-level optimiser (``dask.bag.core.optimize``, ``dask.array.optimization.optimize``)
culls and fuses the graph into a plain dict and the annotations are lost, so the
tasks would run unrouted wherever ``compute`` is called outside the block.

Dask lets the optimiser of a collection type be replaced through the settings
``bag_optimize`` and ``array_optimize`` (``dask.context.globalmethod``). :func:`install`
wraps the optimiser in place there: the wrapper runs it unchanged and, only when the
input graph had ``context`` annotations, gives them back to the tasks they became
(a fused task inherits the context of the tasks fused into it; aliases, which only
point at another task's result, get none).

DataFrames (dask.dataframe with query planning) keep no annotations at all: their
expressions are optimised, fused and turned into tasks on the scheduler, and
Dask warns that annotations "will be ignored". There the mark travels with the
user's function instead: a DataFrame or Series built inside ``use(name)`` gets
its own functions (``map_partitions``, ``apply``, ``map``, ``groupby().apply``...)
wrapped in :class:`Routed`, which calls the function unchanged, and the
scheduler's router finds the wrapper in the spec of each task that calls it,
however it was fused (:func:`marked_context`). Reading, shuffling, aggregating
and writing steps carry no wrapper: they are routed only where dask.dataframe fuses
them into a task that calls the function (reading a partition, typically).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Hashable, Mapping
from functools import update_wrapper
from typing import Any

import dask.config

from dask_context import _compat

ANNOTATION = "context"


def install() -> None:
    """Wrap the bag and array optimisers so that context annotations survive them,
    and mark the functions of DataFrames built under a ``context`` annotation.

    Idempotent; a setting of ``False`` (no optimisation) is left alone. DataFrames
    are hooked only once something imported ``dask.dataframe`` (importing it here
    would import pandas into every program that calls ``use()``).
    """
    if "dask.dataframe" in sys.modules:
        _compat.hook_dataframes(_mark_frame)
    defaults = {"bag_optimize": "dask.bag.core:optimize",
                "array_optimize": "dask.array.optimization:optimize"}
    for key, default in defaults.items():
        current = dask.config.config.get(key)
        if current is False or isinstance(current, KeepContexts):
            continue
        # Dask's own optimiser is imported when a graph is first optimised, not here:
        # importing dask.array would cost the first use() a third of a second
        dask.config.config[key] = KeepContexts(current if current is not None else default)


class KeepContexts:
    """A low-level optimiser, wrapped so that ``context`` annotations survive it.

    A class rather than a closure: Dask's settings travel to worker processes
    pickled, and this pickles by reference.

    Parameters
    ----------
    optimize
        The optimiser it wraps, e.g. ``dask.bag.core.optimize``, or its name as
        ``"module:function"`` (imported on first use).
    """

    def __init__(self, optimize: Callable[..., Any] | str):
        self.optimize = optimize

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        if isinstance(self.optimize, str):
            module, _, attr = self.optimize.partition(":")
            self.optimize = getattr(importlib.import_module(module), attr)
        contexts = contexts_by_key(dsk)
        out = self.optimize(dsk, keys, **kwargs)
        if not contexts:
            return out
        return annotate(out, contexts)

    def __repr__(self) -> str:
        if isinstance(self.optimize, str):
            return f"KeepContexts({self.optimize})"
        return f"KeepContexts({getattr(self.optimize, '__module__', '')}:{getattr(self.optimize, '__name__', '')})"


def contexts_by_key(dsk: Any) -> dict[Hashable, Any]:
    """``{key: context}`` for the tasks of a HighLevelGraph's annotated layers."""
    layers = getattr(dsk, "layers", None)
    if not layers:
        return {}
    out: dict[Hashable, Any] = {}
    for layer in layers.values():
        value = (layer.annotations or {}).get(ANNOTATION)
        if value is not None:
            out.update({k: value(k) if callable(value) else value for k in layer})
    return out


def annotate(dsk: Any, contexts: Mapping[Hashable, Any]) -> Any:
    """A HighLevelGraph of ``dsk``'s tasks whose layers carry their annotations.

    Tasks keep the annotations ``dsk``'s layers had, and get the context of the
    task they were (or the first context among the tasks fused into them).
    """
    from dask._task_spec import Alias
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
    from dask.utils import ensure_dict

    kept: dict[Hashable, dict[str, Any]] = {}
    for layer in getattr(dsk, "layers", {}).values():
        if layer.annotations:
            for k in layer:
                kept[k] = {
                    name: value(k) if callable(value) else value
                    for name, value in layer.annotations.items()
                }
    # annotation values may be unhashable (resources={...}): group by their repr
    groups: dict[str, tuple[dict[str, Any], dict[Hashable, Any]]] = {}
    for key, task in ensure_dict(dsk).items():
        ann = dict(kept.get(key, {}))
        if not isinstance(task, Alias):
            context = _context_of(key, task, contexts)
            if context is not None:
                ann[ANNOTATION] = context
        groups.setdefault(repr(sorted(ann.items())), (ann, {}))[1][key] = task
    layers, deps = {}, {}
    for i, (ann, tasks) in enumerate(groups.values()):
        name = f"dask-context-annotated-{i}"
        layers[name] = MaterializedLayer(tasks, annotations=ann or None)
        deps[name] = set()
    return HighLevelGraph(layers, deps)


def _context_of(key: Hashable, task: Any, contexts: Mapping[Hashable, Any]) -> Any:
    for k in (key, *_compat.fused_keys(task)):
        if k in contexts:
            return contexts[k]
    return None


class Routed:
    """A user function that needs context ``context``: calls it unchanged.

    The mark of a DataFrame's tasks, found by :func:`marked_context` in the spec of
    every task that calls the function. It keeps the function's name, so task keys
    and groups read as they would unwrapped, and its token depends on both.

    Parameters
    ----------
    func
        The user's function.
    context
        The name of the context it needs.

    Examples
    --------
    >>> def score(x):
    ...     return x + 1
    >>> marked = Routed(score, "verifier")
    >>> marked(1), marked.__name__, marked.context
    (2, 'score', 'verifier')
    """

    def __init__(self, func: Callable[..., Any], context: str):
        self.func = func
        self.context = context
        update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        # update_wrapper filled __dict__ (__wrapped__, the function's own
        # attributes): pickle only what rebuilds it
        return (Routed, (self.func, self.context))

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        from dask.base import tokenize

        return ("dask-context-routed", self.context, tokenize(self.func))

    def __repr__(self) -> str:
        return f"Routed({getattr(self.func, '__qualname__', self.func)!r}, {self.context!r})"


def marked_context(spec: Any) -> str | None:
    """The context a task's spec is marked with by a :class:`Routed` function, if any.

    Examples
    --------
    >>> from dask._task_spec import Task
    >>> def score(x): ...
    >>> marked_context(Task("k", Routed(score, "verifier"), 1)), marked_context(Task("k", score, 1))
    ('verifier', None)
    """
    for func in _compat.callables_in(spec):
        if isinstance(func, Routed):
            return func.context
    return None


def _mark_frame(expr: Any, annotations: Mapping[str, Any]) -> Any:
    context = annotations.get(ANNOTATION)
    if not isinstance(context, str):
        return expr

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        return func if isinstance(func, Routed) else Routed(func, context)

    return _compat.wrap_expr_functions(expr, wrap)
