"""Check dask-context's GPU path on one GPU, in under 5 minutes.

    python benchmarks/gpu_check.py                    # on cuda:0, prints a report
    python benchmarks/gpu_check.py --json out.json    # also writes the numbers

What it checks, with the benchmark model (``make_model(dir, "bench")``: 106 M
parameters, loaded in bfloat16, read from storage at ``--storage-mbps``):

1. **load onto the GPU**: a context lands on the GPU, and its size is what
   ``torch.cuda.memory_allocated`` grows by;
2. **storage vs host tier**: the same context loaded from storage, then, after an
   eviction that kept it in host memory, warmed again from there;
3. **two contexts, one-context budget**: with a budget of 1.5 models, loading a
   second model moves the first one to the host tier and device memory holds one
   model, then the first comes back from the host and answers as before;
4. **eviction frees device memory**: without a host tier, ``memory_allocated``
   is back to its level before the load after an eviction;
5. **CUDA out of memory**: a load larger than the free memory fails with
   ``ContextTooLargeError`` naming the context, the device and its free memory, and
   the cache loads the next context;
6. **fact verification**: load-per-task against dask-context on a one-worker
   LocalCluster using the GPU (the papers' workload, ``--claims`` claims in batches
   of ``--batch``).

Without CUDA it says so and exits with status 2. ``--device cpu --preset tiny`` runs
the same steps on the CPU (the GPU-only measurements are marked as skipped), which
is how its plumbing is tested on machines without a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ``python benchmarks/gpu_check.py`` puts benchmarks/ first on the path, where its
# modules would shadow top-level ones; put the repository there instead. Worker
# processes inherit this path and import the task functions from it.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from dask.sizeof import sizeof  # noqa: E402
from dask.utils import format_bytes  # noqa: E402

logger = logging.getLogger("gpu_check")

NO_CUDA = (
    "gpu_check: CUDA is not available here (torch.cuda.is_available() is False): "
    "run it on a machine with an NVIDIA GPU and a CUDA build of torch, or pass "
    "--device cpu --preset tiny for a smoke run of its steps on the CPU."
)

PROBE_CLAIMS = 8
"""Claims judged before and after a round trip through the host tier."""


@dataclass
class Check:
    """The outcome of one step: "ok", "FAIL" or "skipped", a line of detail, numbers."""

    name: str
    status: str
    detail: str
    numbers: dict[str, Any] = field(default_factory=dict)


def allocated(device: str) -> int | None:
    """``torch.cuda.memory_allocated`` of ``device``, None on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated(device: str) -> int | None:
    """``torch.cuda.max_memory_allocated`` since :func:`reset_peak`, None on the CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def warm_cublas(device: str) -> None:
    """Make this thread's cuBLAS workspaces, which stay allocated, before baselines are taken."""
    import torch

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(64, 64, device=device, dtype=dtype)
        (x @ x).sum().item()


def outcome(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def ratio(slow: float, fast: float) -> str:
    """``slow`` over ``fast``, written for the report.

    >>> ratio(1.8, 0.02), ratio(1.0, 0.0)
    ('90x', 'inf x')
    """
    return f"{slow / fast:.0f}x" if fast > 0 else "inf x"


def render(checks: Sequence[Check], header: Sequence[str], seconds: float) -> str:
    """The readable report.

    Examples
    --------
    >>> print(render([Check("load onto the GPU", "ok", "1.80 s")], ["GPU check"], 61.0))
    GPU check
    <BLANKLINE>
    check              result   detail
    load onto the GPU  ok       1.80 s
    <BLANKLINE>
    1 min 1 s: 1 ok, 0 failed, 0 skipped
    """
    width = max([len("check"), *(len(c.name) for c in checks)])
    lines = [*header, "", f"{'check':<{width}}  result   detail"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status:<7}  {c.detail}".rstrip())
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "FAIL", "skipped")}
    minutes, secs = divmod(round(seconds), 60)
    lines += ["", f"{minutes} min {secs} s: {counts['ok']} ok, {counts['FAIL']} failed, "
                  f"{counts['skipped']} skipped"]
    return "\n".join(lines)


def run_check(name: str, step: Callable[[], Check]) -> Check:
    """Run one step; an exception fails it (with the error as its detail), not the run."""
    start = time.perf_counter()
    try:
        check = step()
    except Exception as exc:
        logger.exception("Check %r raised", name)
        check = Check(name, "FAIL", f"raised {exc!r}"[:300])
    check.numbers["seconds"] = time.perf_counter() - start
    logger.info("%s: %s %s", check.name, check.status, check.detail)
    return check


# ------------------------------------------------------------------ the steps
class Steps:
    """The checks, sharing the models and the settings of one run."""

    def __init__(self, args: argparse.Namespace, paths: Sequence[Path]):
        self.args = args
        self.device = args.device
        self.paths = paths
        self.load = {"storage_mbps": args.storage_mbps, "dtype": args.dtype}

    def spec(self, name: str, path: Path, memory: int | None = None) -> Any:
        from benchmarks.loading import load_model
        from dask_context import ContextSpec

        return ContextSpec(name, load_model, args=[str(path)], kwargs=self.load,
                           device=self.device, memory=memory)

    def cache(self, budget: float, host_budget: float) -> tuple[Any, list[dict[str, Any]]]:
        from dask_context import devices
        from dask_context.cache import ContextCache

        events: list[dict[str, Any]] = []
        gpus = devices.discover()
        cache = ContextCache(budget=budget, device=self.device, emit=events.append,
                             gpu_free=[g.free or 0 for g in gpus], host_budget=host_budget)
        return cache, events

    def gpu_only(self, name: str) -> Check | None:
        if self.device.startswith("cuda"):
            return None
        return Check(name, "skipped", f"measures GPU memory; this run is on {self.device}")

    # 1
    def load_onto_device(self) -> Check:
        name = "load onto the device"
        cache, events = self.cache(budget=float("inf"), host_budget=0)
        cache.add(self.spec("A", self.paths[0]))
        before = allocated(self.device)
        lm = cache.get("A")
        loaded = _last(events, "loaded")
        nbytes = int(sizeof(lm))
        on = str(next(lm.model.parameters()).device)
        numbers = {"load_seconds": loaded["seconds"], "nbytes": nbytes, "on": on}
        detail = f"{loaded['seconds']:.2f} s from storage, {format_bytes(nbytes)} of weights on {on}"
        ok = on.startswith(self.device.split(":")[0])
        if before is not None:
            grew = allocated(self.device) - before
            numbers["allocated"] = grew
            detail += f", memory_allocated +{format_bytes(grew)}"
            ok = ok and grew >= nbytes
        cache.clear()
        return Check(name, outcome(ok), detail, numbers)

    # 2 and 3
    def host_tier(self) -> list[Check]:
        from dask_context.factcheck import judge, make_claims

        size = self._model_bytes()
        # one model fits the budget, two do not; the host tier holds two copies
        # (pinned memory is allocated in powers of two)
        cache, events = self.cache(budget=1.5 * size, host_budget=4 * size)
        # declared sizes: a context makes room before it loads, so the device never
        # holds two models, not even during a load
        cache.add(self.spec("A", self.paths[0], memory=size))
        cache.add(self.spec("B", self.paths[1], memory=size))
        probe = make_claims(PROBE_CLAIMS, seed=7)
        baseline = allocated(self.device)

        a = cache.get("A")
        first = judge(a, probe)
        storage = _last(events, "loaded")
        reset_peak(self.device)
        cache.get("B")
        evicted = _last(events, "evicted")
        with_b = allocated(self.device)
        a_again = cache.get("A")
        rewarm = _last(events, "loaded")
        second = judge(a_again, probe)
        with_a = allocated(self.device)
        peak = peak_allocated(self.device)
        # the host tier moves the very object tasks hold; a reload builds another one
        kept = a_again is a
        del a, a_again  # or clear() could not free them
        cache.clear()
        after = allocated(self.device)

        if rewarm["from"] != "host":
            tier = Check("storage vs host tier", "skipped" if not self.device.startswith("cuda") else "FAIL",
                         f"A came back from {rewarm['from']} (the host tier keeps GPU contexts only)",
                         {"storage_seconds": storage["seconds"], "rewarm_seconds": rewarm["seconds"]})
        else:
            faster = rewarm["seconds"] < storage["seconds"]
            tier = Check(
                "storage vs host tier", outcome(faster),
                f"storage {storage['seconds']:.2f} s, host {rewarm['seconds'] * 1e3:.1f} ms "
                f"({ratio(storage['seconds'], rewarm['seconds'])} faster)",
                {"storage_seconds": storage["seconds"], "rewarm_seconds": rewarm["seconds"],
                 "host_bytes": evicted.get("host", {})},
            )
        same = [r["verdict"] for r in first] == [r["verdict"] for r in second]
        numbers = {"budget": 1.5 * size, "model_bytes": size, "evicted_to": evicted.get("tier"),
                   "same_answers": same, "same_object": kept}
        if baseline is None:
            two = Check("two contexts, one-context budget", outcome(same and evicted["context"] == "A"),
                        f"A evicted for B, then back; same answers: {same} (no GPU memory to measure)",
                        numbers)
        else:
            numbers.update(with_b=with_b - baseline, with_a=with_a - baseline,
                           peak=peak - baseline, after=after - baseline)
            one_model = peak - baseline < 1.5 * size
            ok = same and kept and one_model and after == baseline and evicted["tier"] == "host"
            two = Check(
                "two contexts, one-context budget", outcome(ok),
                f"device holds {format_bytes(with_b - baseline)} with B, "
                f"{format_bytes(with_a - baseline)} with A back, at most "
                f"{format_bytes(peak - baseline)} (budget {format_bytes(int(1.5 * size))}); "
                f"A went to the {evicted['tier']} tier; same answers: {same}; "
                f"{format_bytes(after - baseline)} left after clear()",
                numbers,
            )
        return [tier, two]

    # 4
    def eviction_frees(self) -> Check:
        name = "eviction frees device memory"
        skipped = self.gpu_only(name)
        if skipped:
            return skipped
        cache, _ = self.cache(budget=float("inf"), host_budget=0)
        cache.add(self.spec("A", self.paths[0]))
        baseline = allocated(self.device)
        cache.get("A")
        loaded = allocated(self.device) - baseline
        cache.evict("A")
        left = allocated(self.device) - baseline
        return Check(name, outcome(left == 0 and loaded > 0),
                     f"+{format_bytes(loaded)} loaded, {format_bytes(left)} above the "
                     "baseline after the eviction", {"loaded": loaded, "left": left})

    # 5
    def out_of_memory(self) -> Check:
        import torch

        from dask_context import ContextSpec, ContextTooLargeError

        name = "out of memory -> ContextTooLargeError"
        skipped = self.gpu_only(name)
        if skipped:
            return skipped
        cache, events = self.cache(budget=float("inf"), host_budget=0)
        cache.add(ContextSpec("huge", _more_than_free, device=self.device))
        cache.add(ContextSpec("small", torch.nn.Linear, args=[256, 256], device=self.device))
        baseline = allocated(self.device)
        try:
            cache.get("huge")
        except ContextTooLargeError as exc:
            message = str(exc)
        else:
            return Check(name, "FAIL", "the load did not fail")
        left = allocated(self.device) - baseline
        usable = str(next(cache.get("small").parameters()).device).startswith("cuda")
        failed = _last(events, "failed")
        ok = ("'huge'" in message and self.device in message and "free of" in message
              and left == 0 and usable and failed["context"] == "huge")
        return Check(name, outcome(ok), f"{message[:160]}; {format_bytes(left)} left; "
                     f"next context loads: {usable}", {"message": message, "left": left})

    # 6
    def workload(self) -> Check:
        import dask
        from distributed import Client, LocalCluster

        import dask_context as dc
        from benchmarks.runner import batches_of, check, wait_ready
        from benchmarks.tasks import Warmup, load_per_task
        from dask_context.factcheck import make_claims, verify

        name = f"fact verification ({self.args.claims} claims, B={self.args.batch})"
        batches = batches_of(make_claims(self.args.claims), self.args.batch)
        path = str(self.paths[0])
        with dask.config.set({"dask-context.worker.device": self.device}):
            cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
        with cluster, Client(cluster) as client:
            # both arms start with torch and transformers imported, as long-lived workers have
            client.register_plugin(Warmup(self.args.threads))
            wait_ready(client, 1)
            start = time.perf_counter()
            futures = client.map(load_per_task, batches, path=path,
                                 load={**self.load, "device": self.device},
                                 key=[f"load-per-task-{i}" for i in range(len(batches))])
            check(client.gather(futures), batches)
            per_task = time.perf_counter() - start

            dc.register(client, self.spec("verifier", self.paths[0]))
            start = time.perf_counter()
            with dc.use("verifier"):
                futures = client.map(verify, batches,
                                     key=[f"dask-context-{i}" for i in range(len(batches))])
            check(client.gather(futures), batches)
            warm = time.perf_counter() - start
            info = dc.report(client)["contexts"]["verifier"]
        reduction = 1 - warm / per_task
        return Check(
            name, outcome(warm < per_task and info["loads"] == 1),
            f"load-per-task {per_task:.1f} s ({len(batches)} loads), dask-context {warm:.1f} s "
            f"({info['loads']} load): {-reduction:+.1%}",
            {"load_per_task": per_task, "dask_context": warm, "tasks": len(batches),
             "loads": info["loads"], "reduction": reduction},
        )

    def _model_bytes(self) -> int:
        """Bytes of one model's weights as loaded (the dtype of the run)."""
        from dask_context.models import load_causal_lm

        return int(sizeof(load_causal_lm(str(self.paths[0]), dtype=self.args.dtype)))


def _more_than_free(device: str) -> Any:
    """A loader asking for 1 GiB more than the device has free."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return torch.empty(free + 2**30, dtype=torch.uint8, device=device)


def _last(events: Sequence[dict[str, Any]], action: str) -> dict[str, Any]:
    return next(e for e in reversed(events) if e["action"] == action)


def header(args: argparse.Namespace, paths: Sequence[Path]) -> list[str]:
    import torch

    from benchmarks.loading import checkpoint_bytes

    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(args.device)
        where = (f"{props.name}, {format_bytes(props.total_memory)} ({args.device}), "
                 f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        where = f"{args.device} (smoke run: GPU measurements are skipped), torch {torch.__version__}"
    return [
        f"dask-context GPU check: {where}",
        f"model: {args.preset}, {format_bytes(checkpoint_bytes(paths[0]))} on disk, loaded in "
        f"{args.dtype}, read from storage at "
        + (f"{args.storage_mbps:g} MB/s" if args.storage_mbps else "the local disk's speed"),
    ]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for a smoke run")
    p.add_argument("--preset", default="bench", help="model preset (tiny for a smoke run)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--storage-mbps", type=float, default=300.0,
                   help="storage bandwidth of a load from storage, MB/s (0: the disk's)")
    p.add_argument("--claims", type=int, default=384)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=4, help="torch threads of the worker")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dask-context-gpu-check",
                   help="where the generated models are kept between runs")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        # the scheduler of the LocalCluster runs in this process: keep the report readable
        logging.getLogger("distributed").setLevel(logging.WARNING)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    start = time.perf_counter()
    from dask_context.models import make_model

    paths = [make_model(args.cache / f"{args.preset}-{seed}", preset=args.preset, seed=seed)
             for seed in (0, 1)]
    if args.device.startswith("cuda"):
        warm_cublas(args.device)
    steps = Steps(args, paths)
    checks = [run_check("load onto the device", steps.load_onto_device)]
    try:
        checks += steps.host_tier()
    except Exception as exc:
        logger.exception("The host-tier checks raised")
        checks += [Check("storage vs host tier", "FAIL", f"raised {exc!r}"[:300]),
                   Check("two contexts, one-context budget", "FAIL", "not run")]
    checks += [
        run_check("eviction frees device memory", steps.eviction_frees),
        run_check("out of memory -> ContextTooLargeError", steps.out_of_memory),
        run_check("fact verification", steps.workload),
    ]
    seconds = time.perf_counter() - start
    print(render(checks, header(args, paths), seconds))
    if args.json:
        args.json.write_text(json.dumps(
            {"header": header(args, paths), "seconds": seconds,
             "checks": [asdict(c) for c in checks]}, indent=2, default=str))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
