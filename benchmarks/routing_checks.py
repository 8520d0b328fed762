"""Routing checks on real LocalClusters with generated transformers models.

    python -m benchmarks.routing_checks            # every check, a table per check
    python -m benchmarks.routing_checks --json

Three models under a budget of one model per worker, 2 process workers, 30 batches
of 2 claims per model, all submitted at once, marked five ways: ``client.map``
inside ``use()`` with no size declared, with sizes declared 10x too large and 10x
too small, a bag per model built inside ``use()`` and computed outside it, and no
mark at all (the router learns from ``get_context`` calls; the unmarked tasks that
find their model cold on a worker go back once instead of loading it there, counted
as "tasks sent back"). The minimum is 3 loads.
Then one model, a bag built inside ``use()`` and computed outside: loads against
workers, tasks routed and which task groups were routed.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import dask.bag as db
from distributed import Client, LocalCluster

import dask_context as dc
from dask_context.factcheck import make_claims, verify
from dask_context.models import load_causal_lm, make_model

MODES = ("map, no sizes", "map, sizes 10x too large", "map, sizes 10x too small",
         "bags built in use(), computed outside", "no marks at all")


def tiny_models(root: Path) -> list[Path]:
    return [make_model(root / f"m{i}", preset="tiny", seed=i) for i in range(3)]


def cluster(budget: int | None = None) -> LocalCluster:
    settings = {} if budget is None else {"dask-context.worker.memory-budget": budget}
    with dask.config.set(settings):
        return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")


def _sent_back(dask_worker: Any) -> int:
    return len(dask_worker.extensions["dask-context"]._sent_back)


def three_models(paths: list[Path], mode: str) -> dict[str, Any]:
    nbytes = 431_936  # one tiny model's weights; the budget holds one
    memory = {"map, sizes 10x too large": 10 * nbytes, "map, sizes 10x too small": nbytes // 10}.get(mode)
    with cluster(int(1.5 * nbytes)) as lc, Client(lc) as client:
        dc.register(client, *(dc.ContextSpec(f"m{i}", load_causal_lm, args=[str(p)], memory=memory)
                              for i, p in enumerate(paths)))
        batches = [make_claims(2, seed=j) for j in range(30)]
        start = time.perf_counter()
        if mode.startswith("map"):
            futures = []
            for i in range(3):
                with dc.use(f"m{i}"):
                    futures += client.map(verify, batches, context=f"m{i}", key=[f"m{i}-{j}" for j in range(30)])
            client.gather(futures)
        else:
            bags = []
            for i in range(3):
                bag = db.from_sequence(batches, npartitions=30).map(verify, context=f"m{i}")
                if mode.startswith("bags"):
                    with dc.use(f"m{i}"):
                        bag = db.from_sequence(batches, npartitions=30).map(verify, context=f"m{i}")
                bags.append(bag)
            dask.compute(*bags)
        wall = time.perf_counter() - start
        report = dc.report(client)
        sent_back = sum(client.run(_sent_back).values())
        r = report["contexts"]
    return {
        "mode": mode,
        "loads": sum(c["loads"] for c in r.values()),
        "failed loads": sum(c["failures"] for c in r.values()),
        "evictions": sum(c["evictions"] for c in r.values()),
        "most held by a worker at the end (budget 1.5 models)": round(
            max(sum(w["resident"].values()) for w in report["workers"].values()) / nbytes, 2),
        "tasks routed": sum(c["tasks"] for c in r.values()),
        "tasks sent back": sent_back,
        "wall s": round(wall, 2),
    }


def bag_computed_outside(path: Path) -> dict[str, Any]:
    with cluster() as lc, Client(lc) as client:
        dc.register(client, dc.ContextSpec("verifier", load_causal_lm, args=[str(path)]))
        groups: set[str] = set()
        router = lc.scheduler.plugins["dask-context"]
        with dc.use("verifier"):
            verdicts = db.from_sequence(make_claims(400), partition_size=8).map_partitions(verify)
        future = client.compute(verdicts)
        while not future.done():
            groups |= {t.group for t in router.state.tasks.values()}
            time.sleep(0.01)
        n = len(future.result())
        r = dc.report(client)["contexts"]["verifier"]
        all_groups = set(lc.scheduler.task_groups)
    return {"claims": n, "partitions": verdicts.npartitions, "workers": 2, "loads": r["loads"],
            "tasks routed": r["tasks"], "groups routed": sorted(groups),
            "groups not routed": sorted(all_groups - groups)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    root = Path(tempfile.mkdtemp(prefix="dask-context-checks-"))
    paths = tiny_models(root)
    rows = [three_models(paths, mode) for mode in MODES]
    outside = bag_computed_outside(paths[0])
    if args.json:
        print(json.dumps({"three_models": rows, "bag_computed_outside": outside}))
        return
    print("three models, budget of one per worker, 2 workers, 90 batches (minimum 3 loads)")
    for row in rows:
        print("  " + ", ".join(f"{k}: {v}" for k, v in row.items()))
    print("one model, bag built inside use() and computed outside it")
    for k, v in outside.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
