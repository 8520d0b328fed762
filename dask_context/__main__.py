"""The main job: fact verification on a LocalCluster with a generated model.

python -m dask_context verifies claims with a small Llama-style model that it
writes to .dask-context-cache/ first (random weights: nothing is downloaded, and
its verdicts mean nothing, often all one label; the job shows the mechanics and the
timings). It writes the verdicts to --out and prints where.

It needs the llm extra (torch and transformers): pip install "dask-context[llm]".
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dask.bag as db
from distributed import Client, LocalCluster, progress

import dask_context
from dask_context.factcheck import make_claims, verify
from dask_context.models import PRESETS, load_causal_lm, make_model


def run(
    claims: int = 500,
    workers: int = 2,
    batch: int = 10,
    preset: str = "tiny",
    cache: str = ".dask-context-cache",
    out: str | None = "verdicts.jsonl",
    show_progress: bool = False,
    client: Client | None = None,
) -> dict[str, Any]:
    """Verify ``claims`` claims in batches of ``batch``; write them to ``out``; return a summary."""
    model_dir = make_model(Path(cache) / f"model-{preset}", preset=preset)
    own = client is None
    if own:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
        client = Client(cluster)
    try:
        dask_context.register(
            client, dask_context.ContextSpec("verifier", load_causal_lm, args=[str(model_dir)])
        )
        items = make_claims(claims)
        start = time.perf_counter()
        with dask_context.use("verifier"):
            batches = db.from_sequence(items, partition_size=batch).map_partitions(verify)
        future = client.compute(batches)
        if show_progress:
            progress(future)
        verdicts = future.result()
        wall = time.perf_counter() - start
        info = dask_context.report(client)["contexts"]["verifier"]
    finally:
        if own:
            client.close()
            cluster.close()
    if out:
        with open(out, "w") as f:
            f.writelines(json.dumps(v) + "\n" for v in verdicts)
    return {
        "claims": len(verdicts),
        "verdicts": dict(Counter(v["verdict"] for v in verdicts)),
        "wall_seconds": round(wall, 3),
        "batches": batches.npartitions,
        "batch": batch,
        "tasks": info["tasks"],
        "warm_hits": info["hits"],
        "loads": info["loads"],
        "load_seconds": round(info["load_seconds"], 3),
        "workers": workers,
        "model": preset,
        "out": str(Path(out).resolve()) if out else None,
    }


def main(argv: list[str] | None = None) -> None:
    # the module docstring is plain text, shown as written
    parser = argparse.ArgumentParser(
        prog="python -m dask_context", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--claims", type=int, default=500, metavar="N",
                        help="how many claims to generate and verify (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="process workers of the LocalCluster, one thread each (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=10, metavar="N",
                        help="claims per task (default: %(default)s)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--cache", default=".dask-context-cache", help="where the model is written")
    parser.add_argument("--out", default="verdicts.jsonl", help="where the verdicts are written (JSON lines)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    # other libraries' warnings (transformers...); dask-context's own lines are
    # formatted like distributed's already (dask_context._logging)
    logging.basicConfig(level=logging.WARNING)
    summary = run(args.claims, args.workers, args.batch, args.preset, args.cache, args.out,
                  show_progress=not args.json)
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"\n{summary['claims']} claims verified in {summary['wall_seconds']} s on "
        f"{summary['workers']} workers: {summary['batches']} batches of up to "
        f"{summary['batch']} claims, {summary['tasks']} of them run by dask-context"
    )
    print(
        f"model loads: {summary['loads']} ({summary['load_seconds']} s in all, the first "
        f"one in each worker includes importing torch and transformers); "
        f"{summary['warm_hits']} batches found the model warm"
    )
    print("verdicts (the generated model has random weights: expect them all to be one label):")
    for verdict, n in sorted(summary["verdicts"].items()):
        print(f"  {verdict:<16} {n}")
    if summary["out"]:
        print(f"verdicts written to {summary['out']}")


if __name__ == "__main__":
    main()
