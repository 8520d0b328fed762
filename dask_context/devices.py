"""Which GPUs a worker sees, how much memory they have, and the budgets that follow.

Internal module (not API, may change): users import its public names from
``dask_context``; docs/design.md lists what is API.

Discovery never imports torch: importing it costs a worker process about 300 MB of
memory and seconds of start-up, which a worker whose contexts do not use torch
should not pay. It asks, in this order:

1. NVML, through ``pynvml`` (the ``nvidia-ml-py`` package), when it is importable;
2. ``nvidia-smi``, when it is on the ``PATH``;
3. torch, only when something in the process has imported it already.

Both NVML and ``nvidia-smi`` list the machine's GPUs in PCI bus order, whatever the
process may use; ``CUDA_VISIBLE_DEVICES`` says which of them CUDA shows this process
and in which order (``cuda:0`` is its first entry). Its entries are indices in that
order, ``GPU-<uuid>`` ids (or unique prefixes of them) and ``MIG-<uuid>`` ids of MIG
instances; an empty value hides every GPU, and CUDA ignores the entries from the
first invalid one on (``-1`` and ``NoDevFiles`` hide every GPU). Indices are taken in
PCI bus order, as dask-cuda and SLURM write them; CUDA agrees unless
``CUDA_DEVICE_ORDER`` is left at ``FASTEST_FIRST`` on a machine with GPUs of
different models.

The parsing and the decisions are pure functions, doctested; :func:`discover` is the
one function that looks at the machine.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dask_context import _compat, config
from dask_context.policy import resolve_device

logger = logging.getLogger(__name__)

MIB = 2**20

SMI_QUERY = [
    "--query-gpu=index,uuid,memory.total,memory.free",
    "--format=csv,noheader,nounits",
]
"""Arguments of the ``nvidia-smi`` call; memory comes in MiB."""

SMI_TIMEOUT = 10.0
"""Seconds ``nvidia-smi`` may take: a hung driver must not hang a worker's set-up."""

HOST_AUTO_FRACTION = 0.5
"""Share of a GPU worker's memory limit that ``host-memory-budget: auto`` gives to
host copies of contexts. Dask pauses a worker at 80 % of its limit
(``distributed.worker.memory.pause``); the rest is left to task data and the
process itself (torch and CUDA take a few GB)."""


@dataclass(frozen=True)
class GPU:
    """A GPU as NVML or ``nvidia-smi`` reports it.

    ``index`` is its place in PCI bus order (-1 for a MIG instance); ``total`` and
    ``free`` are bytes, None where they could not be read.
    """

    index: int
    uuid: str
    total: int | None
    free: int | None


def visible_ids(value: str | None) -> list[str] | None:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` lets CUDA see, in CUDA's order.

    Returns None when the variable is unset (every GPU is visible).

    Examples
    --------
    >>> visible_ids(None) is None
    True
    >>> visible_ids("")
    []
    >>> visible_ids("2, 0")
    ['2', '0']
    >>> visible_ids("GPU-8932f937-d72c,MIG-4f2a")
    ['GPU-8932f937-d72c', 'MIG-4f2a']
    >>> visible_ids("1,-1,0")    # CUDA stops at the first invalid entry
    ['1']
    >>> visible_ids("NoDevFiles")
    []
    """
    if value is None:
        return None
    ids = []
    for item in value.split(","):
        item = item.strip()
        if not (item.isdigit() or item.startswith(("GPU-", "MIG-"))):
            break
        ids.append(item)
    return ids


def parse_nvidia_smi(text: str) -> list[GPU]:
    """Parse ``nvidia-smi --query-gpu=index,uuid,memory.total,memory.free
    --format=csv,noheader,nounits``.

    Examples
    --------
    >>> parse_nvidia_smi('''0, GPU-aaaa-1111, 81559, 80000
    ... 1, GPU-bbbb-2222, 81559, [N/A]
    ... ''')  # doctest: +NORMALIZE_WHITESPACE
    [GPU(index=0, uuid='GPU-aaaa-1111', total=85520809984, free=83886080000),
     GPU(index=1, uuid='GPU-bbbb-2222', total=85520809984, free=None)]
    """
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4 or not fields[0].isdigit():
            continue
        index, uuid, total, free = fields
        gpus.append(GPU(int(index), uuid, _mib(total), _mib(free)))
    return gpus


def _mib(field: str) -> int | None:
    """``nvidia-smi`` writes "[N/A]" (or "[Not Supported]") where it has no number."""
    return int(float(field) * MIB) if re.fullmatch(r"\d+(\.\d+)?", field) else None


def select_visible(gpus: Sequence[GPU], ids: Sequence[str] | None) -> list[GPU]:
    """The GPUs of ``gpus`` that ``ids`` (from :func:`visible_ids`) names, in its order.

    An id that names no GPU of the list ends it, as in CUDA; a ``MIG-`` id that is
    not in the list stands for a MIG instance whose memory is unknown here.

    Examples
    --------
    >>> gpus = [GPU(0, "GPU-aaaa", 100, 90), GPU(1, "GPU-bbbb", 200, 150)]
    >>> [g.index for g in select_visible(gpus, None)]
    [0, 1]
    >>> [g.index for g in select_visible(gpus, ["1", "0"])]
    [1, 0]
    >>> [g.index for g in select_visible(gpus, ["GPU-bb", "5", "0"])]
    [1]
    >>> select_visible(gpus, ["MIG-cccc"])
    [GPU(index=-1, uuid='MIG-cccc', total=None, free=None)]
    """
    if ids is None:
        return list(gpus)
    out = []
    for item in ids:
        if item.isdigit():
            found = [g for g in gpus if g.index == int(item)]
        else:
            found = [g for g in gpus if g.uuid.startswith(item)]
        if len(found) == 1:
            out.append(found[0])
        elif item.startswith("MIG-") and not found:
            out.append(GPU(-1, item, None, None))
        else:
            break
    return out


def choose_device(requested: str, gpus: Sequence[GPU], own_first: bool) -> str:
    """The worker's default device, for specs whose device is ``"auto"``.

    Parameters
    ----------
    requested
        The setting ``dask-context.worker.device``.
    gpus
        The visible GPUs, in CUDA's order.
    own_first
        Whether ``CUDA_VISIBLE_DEVICES`` is set. dask-cuda (and ``dask cuda
        worker``) give each worker the list of GPUs rotated so that its own comes
        first; SLURM lists the job's own GPUs. So ``"auto"`` means ``cuda:0`` then,
        and the GPU with the most free memory only when every GPU is visible.

    Examples
    --------
    >>> gpus = [GPU(1, "GPU-b", 100, 10), GPU(0, "GPU-a", 100, 90)]
    >>> choose_device("auto", gpus, own_first=True)
    'cuda:0'
    >>> choose_device("auto", gpus, own_first=False)
    'cuda:1'
    >>> choose_device("auto", [], own_first=True)
    'cpu'
    >>> choose_device("cuda:1", gpus, own_first=True)
    'cuda:1'
    """
    if requested == "auto" and own_first and gpus:
        return "cuda:0"
    return resolve_device(requested, [g.free or 0 for g in gpus])


def memory_budget(
    settings: Mapping[str, Any], device: str, gpus: Sequence[GPU], memory_limit: int | None
) -> float:
    """The worker's memory budget for contexts, from ``worker.memory-budget``.

    ``auto`` is ``memory-fraction`` of the device's memory: the GPU's total memory
    when the worker's contexts go to a GPU, else the worker's memory limit.

    Examples
    --------
    >>> s = {"memory-budget": "auto", "memory-fraction": 0.8}
    >>> memory_budget(s, "cpu", [], memory_limit=10_000)
    8000.0
    >>> gpus = [GPU(3, "GPU-a", 100, 50), GPU(0, "GPU-b", 1000, 900)]
    >>> memory_budget(s, "cuda:1", gpus, memory_limit=10_000)
    800.0
    >>> memory_budget(s, "cpu", [], memory_limit=None)
    inf
    >>> memory_budget({**s, "memory-budget": "1 kiB"}, "cpu", [], memory_limit=10_000)
    1024.0
    >>> memory_budget(s, "cuda:0", [GPU(-1, "MIG-c", None, None)], memory_limit=10_000)
    inf
    """
    setting = settings["memory-budget"]
    if setting not in ("auto", None):
        return float(config.get_bytes("worker.memory-budget", setting))
    if device.startswith("cuda"):
        total = gpus[int(device.split(":")[1])].total
        if total is None:
            logger.warning(
                "The memory of %s could not be read (install nvidia-ml-py for MIG "
                "instances): its context budget is unlimited; set "
                "dask-context.worker.memory-budget to bound it", device,
            )
            return math.inf
    else:
        total = memory_limit or math.inf
    return total * config.get_fraction("worker.memory-fraction", settings["memory-fraction"])


def host_budget(setting: Any, device: str, memory_limit: int | None) -> float:
    """Bytes of host memory for copies of contexts evicted from a GPU.

    ``auto`` is :data:`HOST_AUTO_FRACTION` of the worker's memory limit on a worker
    whose contexts go to a GPU, and nothing on a CPU worker (its contexts live in
    host memory already) or a worker without a memory limit.

    Examples
    --------
    >>> host_budget("auto", "cuda:0", memory_limit=64 * 2**30) / 2**30
    32.0
    >>> host_budget("auto", "cpu", memory_limit=64 * 2**30)
    0.0
    >>> host_budget("auto", "cuda:0", memory_limit=None)
    0.0
    >>> host_budget("2 GiB", "cuda:0", memory_limit=None) / 2**30
    2.0
    >>> host_budget(0, "cuda:0", memory_limit=2**30)
    0.0
    """
    if setting != "auto":
        return float(config.get_bytes("worker.host-memory-budget", setting))
    if not device.startswith("cuda") or not memory_limit:
        return 0.0
    return memory_limit * HOST_AUTO_FRACTION


def discover(environ: Mapping[str, str] | None = None, use_nvml: bool = True) -> list[GPU]:
    """The GPUs this process can use, in CUDA's order (``cuda:0`` first).

    Blocking (it may run ``nvidia-smi``): call it off the event loop.

    Parameters
    ----------
    environ
        The environment to read ``CUDA_VISIBLE_DEVICES`` and ``PATH`` from (this
        process's by default).
    use_nvml
        Ask NVML first when ``pynvml`` is importable.
    """
    environ = os.environ if environ is None else environ
    ids = visible_ids(environ.get("CUDA_VISIBLE_DEVICES"))
    if ids == []:
        return []
    gpus = _nvml_gpus(ids) if use_nvml else None
    if gpus is None:
        gpus = _smi_gpus(environ.get("PATH"))
    if gpus is not None:
        return select_visible(gpus, ids)
    gpus = _torch_gpus()
    if gpus is None and ids:
        logger.warning(
            "CUDA_VISIBLE_DEVICES=%s but neither NVML (pip install nvidia-ml-py) nor "
            "nvidia-smi answers: this worker uses no GPU", environ["CUDA_VISIBLE_DEVICES"],
        )
    return gpus or []


def _nvml_gpus(ids: Sequence[str] | None) -> list[GPU] | None:
    """Every GPU NVML reports, plus the MIG instances named in ``ids``; None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.debug("NVML is not usable: %s", exc)
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(_nvml_gpu(pynvml, handle, index))
        for item in ids or ():
            if item.startswith("MIG-"):
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(item)
                except pynvml.NVMLError:
                    continue  # select_visible keeps it, with unknown memory
                gpus.append(_nvml_gpu(pynvml, handle, -1))
        return gpus
    except pynvml.NVMLError as exc:
        logger.warning("NVML failed while listing GPUs (%s); trying nvidia-smi", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvml_gpu(pynvml: Any, handle: Any, index: int) -> GPU:
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    # older bindings return bytes
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    return GPU(index, uuid, int(memory.total), int(memory.free))


def _smi_gpus(path: str | None, timeout: float = SMI_TIMEOUT) -> list[GPU] | None:
    """The GPUs ``nvidia-smi`` (looked up on ``path``) reports; None when it is missing or fails."""
    smi = shutil.which("nvidia-smi", path=path)
    if smi is None:
        return None
    try:
        result = subprocess.run(
            [smi, *SMI_QUERY], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi did not answer (%s): this worker sees no GPU", exc)
        return None
    if result.returncode != 0:
        # no driver, or no GPU at all: nvidia-smi says so and exits non-zero
        logger.info("nvidia-smi failed (%s): this worker sees no GPU", result.stderr.strip())
        return None
    return parse_nvidia_smi(result.stdout)


def _torch_gpus() -> list[GPU] | None:
    """The visible GPUs as torch sees them, only if torch is imported already."""
    torch = _compat.torch_if_imported()
    if torch is None or not torch.cuda.is_available():
        return None
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(GPU(index, f"cuda:{index}", int(total), int(free)))
    return gpus


def memory_info(device: str) -> tuple[int, int] | None:
    """Free and total bytes of ``device`` (``"cpu"`` or ``"cuda:N"``), None if unknown.

    torch's own view is used for a GPU when torch is imported (it counts what its
    allocator caches as used, as an allocation sees it).
    """
    if not device.startswith("cuda"):
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.available), int(memory.total)
    index = int(device.split(":")[1])
    torch = _compat.torch_if_imported()
    if torch is not None and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total)
    gpus = discover()
    if index < len(gpus) and gpus[index].free is not None and gpus[index].total is not None:
        return gpus[index].free, gpus[index].total
    return None
