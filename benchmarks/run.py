"""Benchmark dask-context against load-per-task and its peers, in the papers' regimes.

One command measures everything on this machine and writes ``results.json``,
``results.md`` and ``results.png``:

    python benchmarks/run.py                 # full run (about 30 minutes here)
    python benchmarks/run.py --quick         # tiny model, few tasks, no Ray (about 80 s)

See ``benchmarks/README.md`` for the scenarios, the regimes and how to read the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ``python benchmarks/run.py`` puts benchmarks/ first on the path, where its modules
# would shadow top-level ones; put the repository there instead. Worker processes
# inherit this path and import the task functions from it.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import datetime  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from distributed import Client  # noqa: E402

from benchmarks import coldstart, ray_peer  # noqa: E402
from benchmarks.arms import ArmSetup, DaskArm, DaskContext, GlobalCache, LoadPerTask, Model  # noqa: E402
from benchmarks.calibrate import Calibration, batch_for, calibrate  # noqa: E402
from benchmarks.loading import checkpoint_bytes, read_load_log  # noqa: E402
from benchmarks.plan import (  # noqa: E402
    LIMITS,
    QUICK_LIMITS,
    SCENARIOS,
    Limits,
    Run,
    budget_bytes,
    closest_batch,
    guess_batch,
    limit,
    neighbours,
    plan,
    regimes,
)
from benchmarks.report import fill_reductions, render, row, write  # noqa: E402
from benchmarks.runner import batches_of, bench_cluster, profile_arm, run_arm  # noqa: E402
from benchmarks.warned import Warned, WarnedPeers  # noqa: E402
from dask_context import config, warm_starts  # noqa: E402
from dask_context.factcheck import make_claims  # noqa: E402
from dask_context.models import make_model  # noqa: E402

logger = logging.getLogger("benchmarks")

PEERS = ("global-cache", "ray")
COMPARED = (DaskContext.name, GlobalCache.name, Warned.name, WarnedPeers.name)
"""Arms measured ``--repeat`` times in one-model runs: the comparisons the results
table states (dask-context against the global cache; warned with and without peers)."""
ALL_SCENARIOS = (*SCENARIOS, coldstart.NAME)
CALIBRATION_GRID = (1, 4, 16, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, few tasks, every scenario, no Ray unless asked (about 80 s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="where results.{json,md,png} go (default: benchmarks/results)")
    p.add_argument("--peers", default=None,
                   help=f"comma-separated peers among {', '.join(PEERS)}, or 'none' "
                        "(default: all for a full run, global-cache for --quick)")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                   help=f"comma-separated, among {', '.join(ALL_SCENARIOS)} (default: all)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    p.add_argument("--preset", default=None, help="make_model preset (default: bench; tiny with --quick)")
    p.add_argument("--dtype", default="bfloat16", help="dtype the weights are loaded in")
    p.add_argument("--storage-mbps", type=float, default=None,
                   help="bandwidth of the cold checkpoint read, MB/s; 0 = local disk speed "
                        "(default: 300; 0 with --quick, where the coldstart scenario's shared "
                        "storage still gets 300)")
    p.add_argument("--preempt-every", type=float, default=None,
                   help="seconds between worker kills after the first (default: 20; 2 with --quick)")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds from a warning to the kill in the preemption arms with warnings "
                        "(default: dask-context's preemption.grace setting, 10)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every run's number of claims (for development)")
    p.add_argument("--repeat", type=int, default=None,
                   help="measurements of each arm compared in a one-model run (dask-context, "
                        "global-cache and the warned arms), alternating their order, so that "
                        "the table shows the run-to-run noise (default: 3; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the claims and the kills")
    p.add_argument("--starts", choices=["warm", "cold"], default="warm",
                   help="how nannies start worker processes, for every Dask arm: 'warm' forks "
                        "them from a server that imported torch and transformers "
                        "(dask_context.warm_starts), 'cold' spawns fresh interpreters, Dask's "
                        "default (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=ROOT / ".dask-context-cache" / "benchmarks",
                   help="where the generated checkpoints are kept")
    p.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                   help="only re-write results.md and results.png (into --out) from a results.json")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.render:
        return args
    args.preset = args.preset or ("tiny" if args.quick else "bench")
    if args.storage_mbps is None:
        args.storage_mbps = 0.0 if args.quick else 300.0
    if args.preempt_every is None:
        args.preempt_every = 2.0 if args.quick else 20.0
    if args.grace is None:
        args.grace = config.get_seconds("preemption.grace")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.peers is None:
        args.peers = "global-cache" if args.quick else ",".join(PEERS)
    args.peers = [] if args.peers == "none" else [x.strip() for x in args.peers.split(",") if x.strip()]
    args.scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    for peer in args.peers:
        if peer not in PEERS:
            p.error(f"unknown peer {peer!r}; choose among {', '.join(PEERS)}")
    for name in args.scenarios:
        if name not in ALL_SCENARIOS:
            p.error(f"unknown scenario {name!r}; choose among {', '.join(ALL_SCENARIOS)}")
    if "ray" in args.peers and not ray_peer.available():
        p.error("the ray peer needs ray[data]: pip install 'ray[data]', or pass --peers global-cache")
    return args


class Bench:
    """One benchmark run: the models, the calibration, and the rows measured so far."""

    def __init__(self, args: argparse.Namespace, logs: Path):
        self.args = args
        self.logs = logs
        self.limits: Limits = QUICK_LIMITS if args.quick else LIMITS
        # the scenarios of the papers' comparison; coldstart has a cluster of its own
        self.scenarios = [s for s in args.scenarios if s in SCENARIOS]
        n_models = max((SCENARIOS[s].models for s in self.scenarios), default=1)
        self.models = [
            Model(f"m{i}", str(make_model(args.cache / f"{args.preset}-seed{i}", preset=args.preset, seed=i)))
            for i in range(n_models)
        ]
        self.load: dict[str, Any] = {"dtype": args.dtype, "storage_mbps": args.storage_mbps}
        # the storage the warned+peers arm's staging reads the checkpoint from
        self.storage = coldstart.SharedStorage(str(logs / "storage"), args.storage_mbps)
        self.cal: Calibration | None = None
        self.rows: list[dict[str, Any]] = []
        self._arm_count = 0

    def calibrate(self, client: Client) -> Calibration:
        """Measure L and t, and choose the batch size of each regime.

        t is measured on a grid of batch sizes first, then exactly at the batch size
        each regime gets from it (and its neighbours, for small sizes, where one item
        more or less changes the regime most), then at the size that exact t points
        to. Each regime keeps the exactly measured size whose realised ratio is
        closest to it: timings on a busy machine are noisy, and a single noisy
        measurement must not move a regime far from its target.
        """
        quick = self.args.quick
        cal = self._measure(client, CALIBRATION_GRID, loads=1 if quick else 2,
                            min_seconds=0.1 if quick else 0.5)
        wanted = regimes(self.scenarios)
        candidates = {r: neighbours(guess_batch(r, cal, self.limits), self.limits) for r in wanted}
        exact: set[int] = set()
        for _ in range(2):
            todo = sorted(set().union(*candidates.values()) - exact)
            if not todo:
                break
            cal = cal.merge(self._measure(client, todo))
            exact |= set(todo)
            for r, bs in candidates.items():
                bs |= {batch_for(r, cal.load_seconds, cal.item_seconds[b], self.limits.max_batch) for b in bs}
        fixed = {
            r: closest_batch(r, cal.load_seconds, {b: cal.item_seconds[b] for b in bs if b in exact})
            for r, bs in candidates.items()
        }
        cal.batches = fixed
        self.cal = cal
        logger.info(
            "L = %.2f s; batch sizes: %s", cal.load_seconds,
            ", ".join(f"L/(B t) = {r:g}: B = {b} (t = {cal.item_seconds[b] * 1e3:.1f} ms, "
                      f"realized {cal.load_seconds / (b * cal.item_seconds[b]):.2f})"
                      for r, b in fixed.items()),
        )
        return cal

    def _measure(self, client: Client, batches: Sequence[int], loads: int = 1,
                 min_seconds: float | None = None) -> Calibration:
        if min_seconds is None:
            min_seconds = 0.2 if self.args.quick else 1.5
        claims = make_claims(max(batches), seed=self.args.seed + 1)
        return calibrate(client, self.models[0].path, self.load, claims, batches,
                         loads=loads, min_seconds=min_seconds)

    def runs(self, scenario: str) -> list[Run]:
        assert self.cal is not None
        runs = plan([scenario], self.cal, self.args.workers, self.limits)
        if self.args.scale != 1.0:
            runs = [
                Run(r.scenario, r.regime, r.batch, max(r.batch, r.batch * round(r.items * self.args.scale / r.batch)))
                for r in runs
            ]
        return runs

    def next_setup(self) -> ArmSetup:
        assert self.cal is not None
        self._arm_count += 1
        tag = f"run{self._arm_count}"
        return ArmSetup(tag=tag, load={**self.load, "log": str(self.logs / f"{tag}.jsonl")},
                        load_seconds=self.cal.load_seconds, nbytes=self.cal.nbytes,
                        starts=str(self.logs / f"{tag}-starts.jsonl"))

    def dask_arms(self, run: Run) -> list[DaskArm]:
        """The papers' comparison, and in the preemption scenario the arms with warnings."""
        arms: list[DaskArm] = [LoadPerTask(), DaskContext()]
        if GlobalCache.name in self.args.peers:
            arms.append(GlobalCache())
        if run.scenario.preempt:
            arms += [Warned(self.args.grace), WarnedPeers(self.args.grace, self.storage)]
        return arms

    def measure_run(self, client: Client, run: Run) -> None:
        """Every arm of one run, one after the other; then, in a one-model run, the
        compared arms again (``--repeat``), in reverse order every other round so
        that a drift of the machine's speed falls on both sides alike."""
        assert self.cal is not None
        cal = self.cal
        claims = make_claims(run.items, seed=self.args.seed)
        batches = batches_of(claims, run.batch)
        logger.info("== %s: %d claims x %d models, B=%d, L/(B t) = %.2f",
                    run.label, run.items, run.scenario.models, run.batch,
                    cal.load_seconds / (run.batch * cal.t(run.batch)))
        arms = self.dask_arms(run)
        for arm in arms:
            self.measure_arm(client, run, arm, batches, repeat=0)
        if "ray" in self.args.peers and "ray" in run.scenario.peers:
            self.rows.append(row(run, "ray-data", self.measure_ray(run), cal, self.args.workers))
        if run.scenario.models == 1:
            compared = [a for a in arms if a.name in COMPARED]
            for k in range(1, self.args.repeat):
                for arm in compared[::-1] if k % 2 else compared:
                    self.measure_arm(client, run, arm, batches, repeat=k)

    def measure_arm(self, client: Client, run: Run, arm: DaskArm, batches: list[list[str]],
                    repeat: int) -> None:
        assert self.cal is not None
        cal, workers = self.cal, self.args.workers
        models = self.models[: run.scenario.models]
        setup = self.next_setup()
        measured = run_arm(
            client, arm, models, batches, setup, workers=workers,
            preempt_every=self.args.preempt_every if run.scenario.preempt else None,
            seed=self.args.seed,
        )
        measured["profile"] = profile_arm(
            measured, workers=workers, min_loads=max(len(models), workers),
            load_seconds=cal.load_seconds, inference_seconds=len(models) * run.items * cal.t(run.batch),
        )
        self.rows.append({**row(run, arm.name, measured, cal, workers), "repeat": repeat})

    def measure_ray(self, run: Run) -> dict[str, Any]:
        assert self.cal is not None
        setup = self.next_setup()
        spec = {
            "workers": self.args.workers, "items": run.items, "seed": self.args.seed,
            "batch": run.batch, "path": self.models[0].path, "load": setup.load,
            "threads": self.args.threads,
        }
        # Ray Data can hang (see ray_peer); a run this far above the limit is not coming back
        timeout = max(300.0, 5 * limit(run, self.cal, self.args.workers) + 120)
        logger.info("Ray Data peer: %d claims, B=%d", run.items, run.batch)
        measured = ray_peer.run_ray(spec, timeout)
        loads = read_load_log(setup.load["log"])
        measured.update(loads=loads["loads"], load_seconds=loads["seconds"], loads_per_model=loads["per_model"])
        if "start" in measured and loads["first_start"] is not None:
            # actor processes start and import torch/transformers before loading
            measured["extra"] = {"first_load_after": loads["first_start"] - measured["start"],
                                 "ray_init_seconds": measured["init_seconds"]}
        if "error" in measured:
            logger.warning("Ray Data peer failed: %s", measured["error"])
        return measured


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        render(args.render, args.out)
        return {}
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        # killed workers make distributed log errors it recovers from; the results
        # are checked batch by batch instead
        for noisy in ("distributed", "tornado", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
    started = time.perf_counter()
    if args.starts == "warm":
        warm_starts()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dask-context-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        # scenarios with the same cluster settings share one cluster; the first
        # cluster also measures L and t
        groups: dict[float | None, list[str]] = {}
        for name in bench.scenarios:
            groups.setdefault(SCENARIOS[name].budget_models, []).append(name)
        for budget_models, names in sorted(groups.items(), key=lambda kv: kv[0] is not None):
            budget = None if bench.cal is None else budget_bytes(SCENARIOS[names[0]], bench.cal)
            if budget is None and budget_models is not None:
                # the budget is known once a model was measured: calibrate first
                with bench_cluster(args.workers, args.threads) as client:
                    cal = bench.calibrate(client)
                budget = budget_bytes(SCENARIOS[names[0]], cal)
            with bench_cluster(args.workers, args.threads, budget=budget, allowed_failures=1000,
                               staging=str(Path(tmp) / "nodes")) as client:
                if bench.cal is None:
                    bench.calibrate(client)
                for name in names:
                    for run in bench.runs(name):
                        bench.measure_run(client, run)
        cold: list[dict[str, Any]] = []
        if coldstart.NAME in args.scenarios:
            # shared storage of a finite bandwidth is what this scenario is about
            cold = coldstart.measure(bench.models[0].path, tmp=Path(tmp), mbps=args.storage_mbps or 300.0,
                                     dtype=args.dtype, threads=args.threads)
    fill_reductions(bench.rows)
    meta = {
        "command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "duration": time.perf_counter() - started,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "workers": args.workers,
        "preset": args.preset,
        "dtype": args.dtype,
        "storage_mbps": args.storage_mbps,
        "checkpoint_mb": checkpoint_bytes(bench.models[0].path) / 1e6,
        "quick": args.quick,
        "peers": args.peers,
        "preempt_every": args.preempt_every,
        "grace": args.grace,
        "starts": args.starts,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "notes": notes(args, load_before),
    }
    write(args.out, bench.rows, meta, bench.cal, cold)
    logger.info("Done in %.0f s: %s", meta["duration"], args.out / "results.md")
    return {"meta": meta, "rows": bench.rows, "coldstart": cold}


def notes(args: argparse.Namespace, load_before: tuple[float, float, float]) -> list[str]:
    """Caveats that belong next to the numbers."""
    out = []
    if load_before[0] > 0.5:
        out.append(
            f"The machine was busy when the run started (load average {load_before[0]:.1f} "
            f"on {os.cpu_count()} cores): timings include contention."
        )
    if args.quick:
        out.append("Quick mode: tiny model and few claims; it checks the plumbing, not the regimes.")
    if args.starts == "warm":
        out.append(
            "Worker processes of every Dask arm start warm (dask_context.warm_starts): "
            "nannies fork them, restarts and replacements included, from a server that "
            "imported torch and transformers once. `--starts cold` spawns fresh "
            "interpreters instead, Dask's default; the CPU of the imports then counts in "
            "each new worker."
        )
    if coldstart.NAME in args.scenarios:
        out.append(coldstart.NOTE)
    if "ray" in args.peers:
        out.append(
            "Ray Data runs only in the one-model scenario without preemption; its wall time "
            "includes starting the actor pool (processes, imports, loads), which Ray redoes "
            "for every Dataset execution, but not ray.init."
        )
    return out


if __name__ == "__main__":
    main()
