"""The main job: fact verification on a LocalCluster with a generated model.

``python -m dask_context`` verifies claims with a small random Llama-style model that
it writes to ``.dask-context-cache/`` first. Nothing is downloaded.
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
from distributed import Client, LocalCluster

import dask_context
from dask_context.factcheck import make_claims, verify
from dask_context.models import PRESETS, load_causal_lm, make_model


def run(
    claims: int = 500,
    workers: int = 2,
    batch: int = 10,
    preset: str = "tiny",
    cache: str = ".dask-context-cache",
    client: Client | None = None,
) -> dict[str, Any]:
    """Verify ``claims`` claims in batches of ``batch`` and return a summary."""
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
        bag = db.from_sequence(items, partition_size=batch)
        with dask_context.use("verifier"):
            verdicts = bag.map_partitions(verify).compute()
        wall = time.perf_counter() - start
        info = dask_context.report(client)["contexts"]["verifier"]
    finally:
        if own:
            client.close()
            cluster.close()
    return {
        "claims": len(verdicts),
        "verdicts": dict(Counter(v["verdict"] for v in verdicts)),
        "wall_seconds": round(wall, 3),
        "tasks": info["tasks"],
        "loads": info["loads"],
        "load_seconds": round(info["load_seconds"], 3),
        "workers": workers,
        "batch": batch,
        "model": preset,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dask_context", description=__doc__)
    parser.add_argument("--claims", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=10, help="claims per task")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--cache", default=".dask-context-cache", help="where the model is written")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    summary = run(args.claims, args.workers, args.batch, args.preset, args.cache)
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"{summary['claims']} claims verified in {summary['wall_seconds']} s on "
        f"{summary['workers']} workers ({summary['tasks']} tasks of {summary['batch']}); "
        f"model loads: {summary['loads']} ({summary['load_seconds']} s in all)"
    )
    for verdict, n in sorted(summary["verdicts"].items()):
        print(f"  {verdict:<16} {n}")


if __name__ == "__main__":
    main()
