"""Settings: the YAML defaults merged into ``dask.config`` and the readers.

Every setting is read through :func:`get`; settings that are durations or sizes
through :func:`get_seconds` and :func:`get_bytes`, which reject bad values with an
error that names the setting.
"""

from __future__ import annotations

import copy
import os
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
    raw = get(key, value)
    try:
        seconds = parse_timedelta(raw)
    except (KeyError, ValueError, TypeError):
        seconds = None
    if seconds is None or seconds < 0:
        raise SettingError(
            f"dask-context.{key}: {raw!r} is not a duration; write e.g. '300s', '5m' or "
            "'5 minutes'"
        )
    return seconds


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
    raw = get(key, value)
    try:
        nbytes = parse_bytes(raw) if isinstance(raw, str) else int(raw)
    except (ValueError, TypeError):
        nbytes = -1
    if nbytes < 0:
        raise SettingError(
            f"dask-context.{key}: {raw!r} is not a size; write e.g. '20 GiB' or a number of bytes"
        )
    return nbytes


def get_fraction(key: str, value: Any = None) -> float:
    """A setting in (0, 1]."""
    raw = get(key, value)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value <= 1:
        raise SettingError(f"dask-context.{key}: {raw!r} must be a number in (0, 1]")
    return value


def worker_settings() -> dict[str, Any]:
    """This process's ``dask-context.worker`` settings, as plain data."""
    return {key: get(f"worker.{key}") for key in DEFAULTS["dask-context"]["worker"]}
