"""Resumable runs: a run SIGKILLed at about half, then resumed; and the ledger's cost.

``python -m benchmarks.resume`` measures, on a LocalCluster of 2 process workers
with a context that takes ``--load`` seconds to load:

1. an uninterrupted run of the pipeline (fresh ledger): its compute time;
2. the same run SIGKILLed once the ledger holds half the partitions, then run again:
   the resumed run's compute time against the remaining share of the uninterrupted
   run (``remaining share x uninterrupted time``);
3. the ledger: writing and reading a stored partition (per partition), listing a
   ledger of ``--ledger-partitions`` (100,000) entries, and planning a bag of that
   many partitions (identities of its tasks and the listing).

Writes ``benchmarks/results/resume.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = '''
import json, os, sys, time
import dask.bag as db
from distributed import Client, LocalCluster
import dask_context

ledger, out, items, partitions, per_item, load = sys.argv[1:7]
items, partitions, per_item, load = int(items), int(partitions), float(per_item), float(load)

def load_model(seconds):
    time.sleep(seconds)
    return {"w": 3}

def score(x, seconds):
    m = dask_context.get_context("model")
    time.sleep(seconds)
    return {"item": x, "score": x * m["w"]}

if __name__ == "__main__":
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \\
            Client(c) as client:
        dask_context.register(client, dask_context.ContextSpec("model", load_model, args=[load]))
        with dask_context.use("model"):
            scores = db.from_sequence(range(items), npartitions=partitions).map(score, per_item)
        start = time.perf_counter()
        r = dask_context.resumable(scores, ledger)
        planned = time.perf_counter() - start
        result = r.compute()
        elapsed = time.perf_counter() - start
        loads = dask_context.report(client)["contexts"]["model"]["loads"]
    with open(out, "w") as f:
        json.dump({"seconds": elapsed, "plan_seconds": planned, "loads": loads, "n": len(result)}, f)
'''


def _run(script: Path, ledger: Path, out: Path, args: argparse.Namespace,
         kill_at: int | None = None) -> dict | None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ledger), str(out), str(args.items), str(args.partitions),
         str(args.per_item), str(args.load)], env=env, stderr=subprocess.DEVNULL)
    if kill_at is None:
        proc.wait()
        return json.loads(out.read_text())
    parts = ledger / "parts"
    while not (parts.exists() and len(os.listdir(parts)) >= kill_at):
        if proc.poll() is not None:
            raise RuntimeError("the run ended before it was killed")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # its workers exit with it
    return None


def kill_and_resume(args: argparse.Namespace, work: Path) -> dict:
    script = work / "pipeline.py"
    script.write_text(SCRIPT)
    full = _run(script, work / "full", work / "full.json", args)
    _run(script, work / "resumed", work / "killed.json", args, kill_at=args.partitions // 2)
    done = len(os.listdir(work / "resumed" / "parts"))
    resumed = _run(script, work / "resumed", work / "resumed.json", args)
    remaining = 1 - done / args.partitions
    return {
        "items": args.items, "partitions": args.partitions, "load_seconds": args.load,
        "per_item_seconds": args.per_item,
        "uninterrupted_seconds": full["seconds"], "uninterrupted_loads": full["loads"],
        "stored_at_kill": done, "remaining_share": remaining,
        "resumed_seconds": resumed["seconds"], "resumed_loads": resumed["loads"],
        "resumed_plan_seconds": resumed["plan_seconds"],
        "resumed_over_remaining": resumed["seconds"] / (remaining * full["seconds"]),
    }


def ledger_costs(n: int, work: Path) -> dict:
    import dask.bag as db
    import fsspec

    from dask_context.resume import Ledger, file_name, load, plan, store

    fs = fsspec.filesystem("file")
    root = str(work / "ledger")
    payload = [{"item": i, "score": 3 * i} for i in range(25)]
    start = time.perf_counter()
    for i in range(500):
        store(payload, fs, root, f"{i:032x}", "pickle")
    write = (time.perf_counter() - start) / 500
    names = os.listdir(work / "ledger" / "parts")
    start = time.perf_counter()
    for name in names:
        load(fs, root, name)
    read = (time.perf_counter() - start) / len(names)
    # a ledger of n entries (empty files: the listing's cost does not depend on sizes)
    big = work / "big" / "parts"
    big.mkdir(parents=True)
    for i in range(n):
        (big / file_name(f"{i:032x}", "0" * 32, 1000, "pkl")).touch()
    start = time.perf_counter()
    entries = Ledger(str(work / "big")).read()
    listing = time.perf_counter() - start
    assert len(entries) == n
    bag = db.from_sequence(range(n), npartitions=n).map(str)
    start = time.perf_counter()
    p = plan(bag, str(work / "empty"))
    planning = time.perf_counter() - start
    assert len(p.todo) == n
    return {"write_seconds_per_partition": write, "read_seconds_per_partition": read,
            "ledger_partitions": n, "ledger_listing_seconds": listing,
            "plan_seconds": planning, "plan_seconds_per_partition": planning / n}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--partitions", type=int, default=40)
    parser.add_argument("--per-item", type=float, default=0.03)
    parser.add_argument("--load", type=float, default=2.0)
    parser.add_argument("--ledger-partitions", type=int, default=100_000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "resume.json"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dask-context-resume-"))
    try:
        results = {"kill_and_resume": kill_and_resume(args, work),
                   "ledger": ledger_costs(args.ledger_partitions, work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    k, lg = results["kill_and_resume"], results["ledger"]
    print(f"uninterrupted: {k['uninterrupted_seconds']:.1f}s, {k['uninterrupted_loads']} loads; "
          f"killed with {k['stored_at_kill']}/{k['partitions']} stored; resumed: "
          f"{k['resumed_seconds']:.1f}s, {k['resumed_loads']} loads = "
          f"{k['resumed_over_remaining']:.2f} x the remaining share "
          f"({k['remaining_share']:.0%} of {k['uninterrupted_seconds']:.1f}s)")
    print(f"ledger: write {lg['write_seconds_per_partition'] * 1e3:.2f} ms, read "
          f"{lg['read_seconds_per_partition'] * 1e3:.2f} ms per partition; listing "
          f"{lg['ledger_partitions']:,} entries {lg['ledger_listing_seconds']:.2f}s; planning a "
          f"bag of {lg['ledger_partitions']:,} partitions {lg['plan_seconds']:.2f}s "
          f"({lg['plan_seconds_per_partition'] * 1e6:.0f} us per partition)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
