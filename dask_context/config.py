"""Settings: the YAML defaults merged into ``dask.config`` and the readers.

Every setting is read through :func:`get`; settings that are durations or sizes
through :func:`get_seconds` and :func:`get_bytes`, which reject bad values with an
error that names the setting.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta

from dask_context.errors import SettingError

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
    # the fallback matters when a test harness resets dask.config to a snapshot
    # taken before this module was imported
    return dask.config.get(f"dask-context.{key}", default=default(key))


def default(key: str) -> Any:
    """The packaged default of ``dask-context.<key>``."""
    value: Any = DEFAULTS["dask-context"]
    for part in key.split("."):
        value = value[part]
    return copy.deepcopy(value)


def get_seconds(key: str, value: Any = None) -> float:
    """A duration setting in seconds (``"30s"``, ``"5 minutes"``, ``90``).

    Examples
    --------
    >>> get_seconds("adaptive.keep-warm", "5 minutes")
    300
    >>> get_seconds("adaptive.keep-warm", "5min")
    Traceback (most recent call last):
    ...
    dask_context.errors.SettingError: dask-context.adaptive.keep-warm: '5min' is not a duration; write e.g. '300s', '5m' or '5 minutes'
    """
    return _parsed(key, value, parse_timedelta, lambda s: s >= 0,
                   "a duration; write e.g. '300s', '5m' or '5 minutes'")


def get_bytes(key: str, value: Any = None) -> int:
    """A size setting in bytes (``"2 GiB"``, ``1e9``).

    Examples
    --------
    >>> get_bytes("worker.memory-budget", "1 kiB")
    1024
    >>> get_bytes("worker.memory-budget", "lots")
    Traceback (most recent call last):
    ...
    dask_context.errors.SettingError: dask-context.worker.memory-budget: 'lots' is not a size; write e.g. '20 GiB' or a number of bytes
    """
    return _parsed(key, value, lambda v: parse_bytes(v) if isinstance(v, str) else int(v),
                   lambda n: n >= 0, "a size; write e.g. '20 GiB' or a number of bytes")


def get_fraction(key: str, value: Any = None) -> float:
    """A setting in (0, 1].

    >>> get_fraction("worker.memory-fraction", 1.5)
    Traceback (most recent call last):
    ...
    dask_context.errors.SettingError: dask-context.worker.memory-fraction: 1.5 is not a number in (0, 1]
    """
    return _parsed(key, value, float, lambda f: 0 < f <= 1, "a number in (0, 1]")


def _parsed(key: str, value: Any, parse: Callable[[Any], Any], valid: Callable[[Any], bool],
            what: str) -> Any:
    raw = get(key, value)
    try:
        parsed = parse(raw)
    except (KeyError, ValueError, TypeError):
        parsed = None
    if parsed is None or not valid(parsed):
        raise SettingError(f"dask-context.{key}: {raw!r} is not {what}")
    return parsed


def worker_settings() -> dict[str, Any]:
    """This process's ``dask-context.worker`` settings, as plain data."""
    return {key: get(f"worker.{key}") for key in DEFAULTS["dask-context"]["worker"]}
