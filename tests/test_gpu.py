"""The GPU path on a real GPU: device memory after evictions, the host tier, CUDA out of
memory, dask-cuda and per-worker ``CUDA_VISIBLE_DEVICES``.

The tests marked ``cuda`` need a CUDA GPU and a CUDA build of torch, and are skipped
only when ``torch.cuda.is_available()`` is False (the dask-cuda one also when dask-cuda
is not installed). The last tests check ``benchmarks/gpu_check.py``'s plumbing and run
anywhere.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dask.sizeof import sizeof
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

import dask_context as dc
from dask_context import ContextSpec, ContextTooLargeError, devices
from dask_context.cache import ContextCache
from dask_context.factcheck import make_claims
from dask_context.models import load_causal_lm, make_model

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda:0"
N = 4096  # a Linear(N, N) is 64 MiB of float32 weights

cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def linear(n: int, device: str) -> torch.nn.Module:
    """A context of (n * n + n) * 4 bytes, built on ``device``."""
    return torch.nn.Linear(n, n, device=device)


def more_than_free(device: str) -> torch.Tensor:
    """A context 1 GiB larger than the free memory of ``device``."""
    free, _ = torch.cuda.mem_get_info(device)
    return torch.empty(free + 2**30, dtype=torch.uint8, device=device)


def allocated() -> int:
    torch.cuda.synchronize(DEVICE)
    return torch.cuda.memory_allocated(DEVICE)


def warm_cublas() -> None:
    """Make this thread's cuBLAS workspace, which stays allocated, before a baseline is taken."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(64, 64, device=DEVICE, dtype=dtype)
        (x @ x).sum().item()


def gpu_cache(**kwargs) -> tuple[ContextCache, list[dict]]:
    events: list[dict] = []
    gpus = devices.discover()
    cache = ContextCache(device=DEVICE, gpu_free=[g.free or 0 for g in gpus],
                         emit=events.append, **kwargs)
    return cache, events


def last(events, action, name=None):
    return next(e for e in reversed(events) if e["action"] == action and name in (None, e["context"]))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> list[Path]:
    """Two "small" checkpoints (8 M parameters): big enough to time copies."""
    root = tmp_path_factory.mktemp("gpu-models")
    return [make_model(root / f"small-{seed}", preset="small", seed=seed) for seed in (0, 1)]


@cuda
def test_discovery_sees_the_gpus_torch_sees():
    gpus = devices.discover()
    assert len(gpus) == torch.cuda.device_count()
    for index, gpu in enumerate(gpus):
        assert gpu.total == pytest.approx(torch.cuda.get_device_properties(index).total_memory, rel=0.02)


@cuda
def test_eviction_returns_memory_allocated_to_its_level_before_the_load():
    size = (N * N + N) * 4
    cache, events = gpu_cache(budget=1.5 * size)
    for name in "ab":
        cache.add(ContextSpec(name, linear, args=[N]))
    baseline = allocated()
    cache.get("a")
    assert allocated() - baseline >= size
    cache.evict("a")
    assert allocated() == baseline
    # the next context fits: b evicts a (one context's budget) and takes its place
    cache.get("a")
    cache.get("b")
    assert last(events, "evicted", "a")["reason"] == "memory budget"
    assert set(cache.resident_bytes()) == {"b"} and allocated() - baseline < 1.5 * size
    cache.clear()
    assert allocated() == baseline


@cuda
def test_the_host_tier_rewarms_faster_than_storage_with_the_same_answers(two_models):
    size = sizeof(load_causal_lm(str(two_models[0])))
    cache, events = gpu_cache(budget=1.5 * size, host_budget=4 * size)
    # declared sizes: B makes room before it loads, so two models never share the GPU
    cache.add(ContextSpec("A", load_causal_lm, args=[str(two_models[0])], memory=size))
    cache.add(ContextSpec("B", load_causal_lm, args=[str(two_models[1])], memory=size))
    prompts, words = [f"claim : {c} . answer :" for c in make_claims(8)], ["true", "false"]
    warm_cublas()
    baseline = allocated()

    a = cache.get("A")
    before = a.next_token_logprobs(prompts, words)
    storage = last(events, "loaded", "A")
    torch.cuda.reset_peak_memory_stats(DEVICE)
    cache.get("B")
    assert last(events, "evicted", "A")["tier"] == "host"
    params = list(a.model.parameters())
    assert all(p.device.type == "cpu" and p.is_pinned() for p in params)
    assert allocated() - baseline < 1.5 * size  # B alone on the GPU

    assert cache.get("A") is a
    rewarm = last(events, "loaded", "A")
    assert rewarm["from"] == "host" and storage["from"] == "storage"
    assert rewarm["seconds"] < storage["seconds"]
    assert all(p.device == torch.device(DEVICE) for p in a.model.parameters())
    np.testing.assert_allclose(a.next_token_logprobs(prompts, words), before, rtol=1e-5, atol=1e-6)
    assert allocated() - baseline < 1.5 * size  # A alone, B on the host
    assert torch.cuda.max_memory_allocated(DEVICE) - baseline < 1.5 * size  # never both
    del a, params
    cache.clear()
    assert allocated() == baseline and cache.host_bytes() == {}


@cuda
def test_a_context_sharing_tensors_with_a_resident_one_stays_on_the_gpu_for_it():
    base = torch.nn.Linear(256, 256, device=DEVICE)  # a base model two contexts share
    cache, events = gpu_cache(host_budget=2**30)
    cache.add(ContextSpec("a", dict, kwargs={"base": base, "head": torch.ones(8, device=DEVICE)}))
    cache.add(ContextSpec("b", dict, kwargs={"base": base}))
    cache.get("a")
    cache.get("b")
    cache.evict_unused(["a"])
    assert last(events, "evicted", "a")["tier"] is None and cache.host_bytes() == {}
    assert base.weight.is_cuda and cache.get("b")["base"] is base


@cuda
def test_cuda_out_of_memory_is_context_too_large_and_the_cache_goes_on():
    cache, events = gpu_cache()
    cache.add(ContextSpec("huge", more_than_free))
    cache.add(ContextSpec("small", linear, args=[256]))
    baseline = allocated()
    with pytest.raises(ContextTooLargeError, match=r"context 'huge' does not fit on cuda:0: OutOfMemoryError while loading it, with .* free of .* on cuda:0"):
        cache.get("huge")
    assert allocated() == baseline
    assert last(events, "failed")["context"] == "huge"
    assert next(cache.get("small").parameters()).is_cuda


@cuda
def test_a_worker_that_ran_out_of_memory_stays_usable():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        dc.register(client, ContextSpec("huge", more_than_free), ContextSpec("small", linear, args=[256]))
        with dc.use("huge"):
            future = client.submit(lambda: dc.get_context("huge").shape)
        with pytest.raises(ContextTooLargeError, match="context 'huge' does not fit on cuda:0"):
            future.result(timeout=120)
        with dc.use("small"):
            device, pid = client.submit(
                lambda: (str(next(dc.get_context("small").parameters()).device), os.getpid())
            ).result(timeout=120)
        assert device == DEVICE and pid in client.run(os.getpid).values()
        assert dc.report(client)["contexts"]["huge"]["failures"] >= 1


def worker_view() -> dict:
    """On a worker: its CUDA_VISIBLE_DEVICES, its GPUs and the device of its context."""
    from distributed import get_worker

    contexts = get_worker().extensions["dask-context"]
    return {
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": [(g.index, g.uuid, g.total) for g in devices.discover()],
        "device": contexts.device,
        "budget": contexts.cache.budget,
        "context_on": str(next(dc.get_context("lin").parameters()).device),
    }


def check_own_gpus(client: Client) -> list[dict]:
    dc.register(client, ContextSpec("lin", linear, args=[1024]))
    views = []
    for address in client.scheduler_info()["workers"]:
        with dc.use("lin"):
            views.append(client.submit(worker_view, workers=[address], pure=False).result(timeout=120))
    for view in views:
        own = view["gpus"][0]
        assert view["device"] == "cuda:0" and view["context_on"] == DEVICE
        assert view["budget"] == pytest.approx(0.8 * own[2])
        # cuda:0 of the worker is the first GPU its CUDA_VISIBLE_DEVICES names
        assert view["visible"].split(",")[0] in (str(own[0]), own[1])
    # each worker has a GPU of its own
    assert len({v["gpus"][0][1] for v in views}) == len(views)
    return views


@cuda
def test_local_cuda_cluster_pins_each_worker_to_its_own_gpu():
    dask_cuda = pytest.importorskip("dask_cuda")
    with dask_cuda.LocalCUDACluster(dashboard_address=":0") as cluster, Client(cluster) as client:
        views = check_own_gpus(client)
    assert len(views) == torch.cuda.device_count()


@cuda
def test_dask_workers_with_their_own_cuda_visible_devices():
    # what `CUDA_VISIBLE_DEVICES=i dask worker ...` per GPU does
    workers = {
        i: {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
        for i in range(torch.cuda.device_count())
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(len(workers))
        views = check_own_gpus(client)
    assert sorted(v["gpus"][0][0] for v in views) == list(range(len(workers)))


# ---------------------------------------------------------------- gpu_check, anywhere
def gpu_check(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_check_without_cuda_says_so():
    proc = gpu_check()
    assert proc.returncode == 2
    assert "CUDA is not available here" in proc.stderr and "--device cpu" in proc.stderr


def test_gpu_check_steps_run_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = gpu_check("--device", "cpu", "--preset", "tiny", "--claims", "16", "--batch", "8",
                     "--threads", "1", "--cache", str(tmp_path / "models"), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert {c["status"] for c in checks.values()} <= {"ok", "skipped"}
    assert checks["load onto the device"]["status"] == "ok"
    assert checks["two contexts, one-context budget"]["numbers"]["same_answers"] is True
    workload = next(c for name, c in checks.items() if name.startswith("fact verification"))
    assert workload["status"] == "ok" and workload["numbers"]["loads"] == 1
    assert "dask-context GPU check: cpu" in proc.stdout and "fact verification" in proc.stdout


def test_gpu_check_doctests():
    module = importlib.import_module("benchmarks.gpu_check")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
