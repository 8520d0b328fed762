"""Settings: the YAML defaults merged into ``dask.config`` and the one reader."""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

_YAML = os.path.join(os.path.dirname(__file__), "dask-context.yaml")


with open(_YAML) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.update_defaults(DEFAULTS)


def get(key: str, value: Any = None) -> Any:
    """Return the setting ``dask-context.<key>``, unless ``value`` is given.

    Parameters
    ----------
    key
        Dotted key below ``dask-context``, e.g. ``"worker.memory-budget"``.
    value
        An explicit value (a keyword argument a user passed); it wins when not None.

    Examples
    --------
    >>> get("scheduler.prefetch")
    1
    >>> get("scheduler.prefetch", 4)
    4
    >>> with dask.config.set({"dask-context.scheduler.prefetch": 2}):
    ...     get("scheduler.prefetch")
    2
    """
    if value is not None:
        return value
    default: Any = DEFAULTS["dask-context"]
    for part in key.split("."):
        default = default[part]
    # the fallback matters when a test harness resets dask.config to a snapshot
    # taken before this module was imported
    return dask.config.get(f"dask-context.{key}", default=default)
