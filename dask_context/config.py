"""Settings: the YAML defaults merged into ``dask.config`` and the readers.

Every setting is read through :func:`get`; settings that are durations or sizes
through :func:`get_seconds` and :func:`get_bytes`, which reject bad values with an
error that names the setting. :func:`to_seconds` and :func:`to_bytes` are the one
parser of durations and sizes, shared with :class:`~dask_context.ContextSpec`;
:func:`check_worker` validates a worker's settings all at once, when it starts.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
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
    return _parsed(key, value, to_seconds, lambda s: s >= 0,
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
    return _parsed(key, value, to_bytes, lambda n: n >= 0,
                   "a size; write e.g. '20 GiB' or a number of bytes")


def get_fraction(key: str, value: Any = None) -> float:
    """A setting in (0, 1].

    >>> get_fraction("worker.memory-fraction", 1.5)
    Traceback (most recent call last):
    ...
    dask_context.errors.SettingError: dask-context.worker.memory-fraction: 1.5 is not a number in (0, 1]
    """
    return _parsed(key, value, lambda v: float(v) if isinstance(v, str) else _to_number(v),
                   lambda f: 0 < f <= 1, "a number in (0, 1]")


def to_seconds(value: Any) -> float:
    """A duration in seconds: a number, or a string with Dask's units.

    Negative numbers come back as they are, for the caller to reject with its own
    message.

    Raises
    ------
    ValueError
        If ``value`` is not a duration (whatever Dask's parser raised).

    Examples
    --------
    >>> to_seconds("1.5s"), to_seconds("5 minutes"), to_seconds(2)
    (1.5, 300, 2)
    >>> to_seconds("5 parsecs")
    Traceback (most recent call last):
    ...
    ValueError: '5 parsecs' is not a duration
    """
    return _quantity(value, parse_timedelta, "a duration")


def to_bytes(value: Any) -> int:
    """A size in bytes: a number, or a string like ``"2 GiB"``.

    Negative numbers come back as they are, for the caller to reject with its own
    message.

    Raises
    ------
    ValueError
        If ``value`` is not a size.

    Examples
    --------
    >>> to_bytes("2 GiB"), to_bytes("1e3"), to_bytes(1.5e9)
    (2147483648, 1000, 1500000000)
    >>> to_bytes("5 parsecs")
    Traceback (most recent call last):
    ...
    ValueError: '5 parsecs' is not a size
    """
    return int(_quantity(value, parse_bytes, "a size"))


# what dask.utils' parsers raise on malformed input
_PARSE_ERRORS = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError)


def _quantity(value: Any, parse: Callable[[str], Any], what: str) -> Any:
    """A number as it is, or a string through Dask's ``parse``; ValueError otherwise."""
    if isinstance(value, str) and value.strip():
        try:
            return parse(value.strip())
        except _PARSE_ERRORS:
            # Dask raises KeyError for an unknown unit, IndexError for "", ...
            raise ValueError(f"{value!r} is not {what}") from None
    return _to_number(value, what)


def _to_number(value: Any, what: str = "a number") -> Any:
    # bools are ints to Python, but ``memory=True`` is a mistake, not one byte
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not {what}")
    return value


def _parsed(key: str, value: Any, parse: Callable[[Any], Any], valid: Callable[[Any], bool],
            what: str) -> Any:
    raw = get(key, value)
    try:
        parsed = parse(raw)
    except _PARSE_ERRORS:
        parsed = None
    if parsed is None or not valid(parsed):
        raise SettingError(f"dask-context.{key}: {raw!r} is not {what}")
    return parsed


def worker_settings() -> dict[str, Any]:
    """This process's ``dask-context.worker`` settings, as plain data."""
    return {key: get(f"worker.{key}") for key in DEFAULTS["dask-context"]["worker"]}


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_worker(settings: Mapping[str, Any]) -> None:
    """Reject a worker's settings (:func:`worker_settings`) if any cannot be used.

    A worker checks them all when it sets dask-context up, before it announces
    itself, so that a bad value stops it at start instead of failing later, and
    never reaches the settings the router hands to other workers.

    Raises
    ------
    SettingError
        For the first bad setting, naming it (``dask-context.worker.<key>``).

    Examples
    --------
    >>> check_worker(worker_settings())
    >>> check_worker({**worker_settings(), "memory-budget": "5 parsecs"})
    Traceback (most recent call last):
    ...
    dask_context.errors.SettingError: dask-context.worker.memory-budget: '5 parsecs' is not a size; write e.g. '20 GiB' or a number of bytes
    >>> check_worker({**worker_settings(), "device": "gpu"})
    Traceback (most recent call last):
    ...
    dask_context.errors.SettingError: dask-context.worker.device: 'gpu' is not 'auto', 'cpu', 'cuda' or 'cuda:N'
    >>> check_worker({**worker_settings(), "torch-threads": 0})
    Traceback (most recent call last):
    ...
    dask_context.errors.SettingError: dask-context.worker.torch-threads: 0 is not null or a number of threads >= 1
    """
    def bad(key: str, what: str) -> SettingError:
        return SettingError(f"dask-context.worker.{key}: {settings[key]!r} is not {what}")

    device = settings["device"]
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    # the readers the worker uses raise SettingError themselves, naming the setting;
    # an explicit value is passed, so a None must not fall back to the config
    if settings["memory-budget"] not in ("auto", None):
        get_bytes("worker.memory-budget", settings["memory-budget"])
    if settings["memory-fraction"] is None:
        raise bad("memory-fraction", "a number in (0, 1]")
    get_fraction("worker.memory-fraction", settings["memory-fraction"])
    if settings["host-memory-budget"] != "auto":
        if settings["host-memory-budget"] is None:
            raise bad("host-memory-budget", "'auto' or a size")
        get_bytes("worker.host-memory-budget", settings["host-memory-budget"])
    threads = settings["torch-threads"]
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise bad("torch-threads", "null or a number of threads >= 1")
    if settings["failed-load-retry"] is None:
        raise bad("failed-load-retry", "a duration")
    get_seconds("worker.failed-load-retry", settings["failed-load-retry"])
    node = settings["node"]
    # an environment variable ``..._NODE=7`` arrives as the number 7
    if node is not None and (isinstance(node, bool) or not isinstance(node, (str, int))
                             or node == ""):
        raise bad("node", "null or a node name")
    staging = settings["staging-dir"]
    if staging is not None and (not isinstance(staging, (str, os.PathLike)) or staging == ""):
        raise bad("staging-dir", "null or a directory")
