"""How a context sits in memory and moves between a device and host memory.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.

The worker's cache (:mod:`dask_context.cache`) decides *what* is loaded, kept,
copied to host memory or dropped; this module does the moving and the measuring:
:func:`place` puts a freshly loaded context on its device, :class:`TorchMover` copies
a GPU context's tensors to (pinned) host memory and back, :func:`release_device_memory`
gives freed memory back to the CUDA driver. torch is never imported here: it is used
only when a loader imported it already.
"""

from __future__ import annotations

import collections
import gc
import logging
import types
from collections.abc import Sequence
from typing import Any, Protocol

from dask.sizeof import sizeof

from dask_context import _compat, devices

logger = logging.getLogger(__name__)

# Most objects device_tensors looks into before it gives up on a context (it is then
# dropped on eviction, as without a host tier): a bound on the time an eviction takes.
WALK_LIMIT = 100_000

# Objects device_tensors never looks into: they hold no context state of their own.
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
           types.MethodType, str, bytes, bytearray, int, float, complex, bool, type(None))


@sizeof.register_lazy("torch")
def _register_torch_sizeof() -> None:
    import torch

    @sizeof.register(torch.Tensor)
    def _tensor(t: torch.Tensor) -> int:
        return t.element_size() * t.nelement()

    @sizeof.register(torch.nn.Module)
    def _module(m: torch.nn.Module) -> int:
        tensors = {id(t): t for t in [*m.parameters(), *m.buffers()]}
        return sum(_tensor(t) for t in tensors.values())


def place(obj: Any, device: str) -> Any:
    """Move the torch modules and tensors in ``obj`` (or directly inside a tuple,
    list or dict in ``obj``) to ``device``; leave everything else as it is.

    Examples
    --------
    >>> place({"template": "Claim: {claim}"}, "cpu")
    {'template': 'Claim: {claim}'}
    """
    torch = _compat.torch_if_imported()
    if torch is not None and isinstance(obj, (torch.nn.Module, torch.Tensor)):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: place(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [place(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def release_device_memory() -> None:
    """Return freed memory to the allocators and the CUDA driver after an eviction.

    Also empties torch's cache of pinned host memory, so that dropped host copies
    leave the process instead of staying cached outside the host budget.
    """
    gc.collect()
    torch = _compat.torch_if_imported()
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        if empty_host_cache is not None:  # torch >= 2.8
            empty_host_cache()


def device_tensors(obj: Any, device_type: str) -> list[Any] | None:
    """The distinct torch tensors on devices of type ``device_type`` inside ``obj``.

    It looks through tuples, lists, sets, dicts, torch modules and the attributes of
    other objects, so that a model inside a wrapper (``LanguageModel.model``) is
    found. Returns None when the tensors cannot be moved one at a time: two of them
    share storage (views, which moving would split into copies), or ``obj`` holds
    more than :data:`WALK_LIMIT` objects.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(2, 3)
    >>> [tuple(t.shape) for t in device_tensors({"model": lin, "n": 3}, "cpu")]
    [(3, 2), (3,)]
    >>> device_tensors({"model": lin}, "cuda")
    []
    >>> t = torch.zeros(4)
    >>> device_tensors([t, t[:2]], "cpu") is None
    True
    """
    found = _walk_tensors(obj, device_type)
    if found is None:
        return None
    storages = [
        (t.device, t.untyped_storage().data_ptr()) for t in found.values() if t.nelement()
    ]
    if len(set(storages)) < len(storages):
        return None
    return list(found.values())


def _walk_tensors(obj: Any, device_type: str) -> dict[int, Any] | None:
    """Tensors on ``device_type`` reachable from ``obj``, by id; None past :data:`WALK_LIMIT`."""
    torch = _compat.torch_if_imported()
    if torch is None:
        return {}
    found: dict[int, Any] = {}
    seen: set[int] = set()
    queue = collections.deque([obj])
    while queue:
        item = queue.popleft()
        if isinstance(item, _OPAQUE) or id(item) in seen:
            continue
        seen.add(id(item))
        if len(seen) > WALK_LIMIT:
            return None
        if isinstance(item, torch.Tensor):
            if item.device.type == device_type:
                found[id(item)] = item
        elif isinstance(item, dict):
            queue.extend(item.values())
        elif isinstance(item, (tuple, list, set, frozenset)):
            queue.extend(item)
        elif isinstance(getattr(item, "__dict__", None), dict):
            queue.extend(vars(item).values())
    return found


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says a device (or the host) ran out of memory.

    Examples
    --------
    >>> is_out_of_memory(MemoryError())
    True
    >>> is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    True
    >>> is_out_of_memory(RuntimeError("shape mismatch"))
    False
    """
    torch = _compat.torch_if_imported()
    if isinstance(exc, MemoryError):
        return True
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    # CUDA errors raised outside torch's allocator (cuBLAS handles, a new CUDA
    # context) come as plain RuntimeErrors
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


def pinned_size(nbytes: int) -> int:
    """Host bytes torch's pinned-memory allocator takes for ``nbytes``: it rounds each
    block up to a power of two.

    Examples
    --------
    >>> pinned_size(1000), pinned_size(1024), pinned_size(0)
    (1024, 1024, 0)
    """
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


class Mover(Protocol):
    """How a :class:`ContextCache` moves contexts between a device and host memory."""

    def place(self, obj: Any, device: str) -> Any:
        """Put a freshly loaded context on ``device``; return it."""

    def find(self, obj: Any, device: str, others: Sequence[Any]) -> Any | None:
        """What of ``obj`` (a context on ``device``) would move to the host, or None
        when nothing would: a context on the CPU, or one that cannot move, such as one
        sharing tensors with ``others`` (the contexts that stay)."""

    def host_nbytes(self, moved: Any) -> int:
        """Host bytes a copy of ``moved`` takes."""

    def to_host(self, moved: Any) -> None:
        """Copy ``moved`` to host memory, freeing it on its device."""

    def to_device(self, moved: Any) -> None:
        """Copy ``moved`` back where it was."""

    def release(self) -> None:
        """Give freed memory back (after an eviction, a failure or a dropped copy)."""

    def memory(self, device: str) -> tuple[int, int] | None:
        """Free and total bytes of ``device``, None if unknown."""


class TorchMover:
    """The real :class:`Mover`: torch tensors between GPUs and (pinned) host memory.

    It moves every tensor of a context that lives on a GPU, by swapping the tensor's
    data in place (``tensor.data = copy``), so that modules, wrappers and containers
    keep their identity and whoever holds the context sees it moved.
    """

    def place(self, obj: Any, device: str) -> Any:
        return place(obj, device)

    def find(self, obj: Any, device: str, others: Sequence[Any]) -> list[tuple[Any, Any]] | None:
        if not device.startswith("cuda") or _compat.torch_if_imported() is None:
            return None
        tensors = device_tensors(obj, "cuda")
        if not tensors:
            return None
        # moving a tensor another context uses (a shared base model) would pull it
        # from under that context
        kept = _walk_tensors(others, "cuda")
        if kept is None or not kept.keys().isdisjoint(map(id, tensors)):
            logger.info("A context may share tensors with another one: it is not copied to the host")
            return None
        return [(t, t.device) for t in tensors]

    def host_nbytes(self, moved: list[tuple[Any, Any]]) -> int:
        sizes = [t.element_size() * t.nelement() for t, _ in moved]
        return sum(pinned_size(n) for n in sizes) if self._pin() else sum(sizes)

    def to_host(self, moved: list[tuple[Any, Any]]) -> None:
        import torch

        pin = self._pin()
        for t, _ in moved:
            host = None
            if pin:
                try:
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                except RuntimeError:
                    # page-locked memory is scarcer than memory: fall back to pageable
                    logger.info("No pinned host memory left; host copies are pageable")
                    pin = False
            if host is None:
                host = torch.empty(t.shape, dtype=t.dtype)
            # non-blocking only into pinned memory: into pageable memory it is unsafe
            host.copy_(t, non_blocking=pin)
            t.data = host
        self._synchronize(moved)

    def to_device(self, moved: list[tuple[Any, Any]]) -> None:
        for t, device in moved:
            # from pinned memory the copies overlap; synchronize waits for them all
            t.data = t.data.to(device, non_blocking=True)
        self._synchronize(moved)

    def release(self) -> None:
        release_device_memory()

    def memory(self, device: str) -> tuple[int, int] | None:
        return devices.memory_info(device)

    @staticmethod
    def _pin() -> bool:
        torch = _compat.torch_if_imported()
        return torch is not None and torch.cuda.is_available()

    @staticmethod
    def _synchronize(moved: list[tuple[Any, Any]]) -> None:
        import torch

        for device in {d for _, d in moved if d.type == "cuda"}:
            torch.cuda.synchronize(device)
