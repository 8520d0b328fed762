"""Keep ``use()`` marks through Dask's low-level graph optimisation.

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
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import dask.config

from dask_context import _compat

ANNOTATION = "context"


def install() -> None:
    """Wrap the bag and array optimisers so that context annotations survive them.

    Idempotent; a setting of ``False`` (no optimisation) is left alone.
    """
    defaults = {"bag_optimize": ("dask.bag.core", "optimize"),
                "array_optimize": ("dask.array.optimization", "optimize")}
    for key, (module, attr) in defaults.items():
        current = dask.config.config.get(key)
        if current is False or isinstance(current, KeepContexts):
            continue
        if current is None:
            try:
                current = getattr(importlib.import_module(module), attr)
            except ImportError:  # dask.array needs numpy
                continue
        dask.config.config[key] = KeepContexts(current)


class KeepContexts:
    """A low-level optimiser, wrapped so that ``context`` annotations survive it.

    A class rather than a closure: Dask's settings travel to worker processes
    pickled, and this pickles by reference.

    Parameters
    ----------
    optimize
        The optimiser it wraps, e.g. ``dask.bag.core.optimize``.
    """

    def __init__(self, optimize: Callable[..., Any]):
        self.optimize = optimize

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        contexts = contexts_by_key(dsk)
        out = self.optimize(dsk, keys, **kwargs)
        if not contexts:
            return out
        return annotate(out, contexts)

    def __repr__(self) -> str:
        return f"KeepContexts({getattr(self.optimize, '__module__', '')}.{getattr(self.optimize, '__name__', '')})"


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
