"""Fact verification with a warm model on every Dask worker.

Claims in, verdicts out: each worker loads the language model once, keeps it for
every task (and every later computation, script or client), and the scheduler
sends the tasks to the workers that hold it. Run it again against the same cluster:
the model is still warm there, and nothing loads again.

Run it as it is (a LocalCluster and a small random model generated on the spot):

    python examples/fact_verification.py

or on your own cluster, model and claims:

    python examples/fact_verification.py --scheduler tcp://host:8786 \\
        --model /path/to/local/checkpoint --claims-file claims.txt --out verdicts.jsonl

--model takes any local causal-LM checkpoint that transformers can load with
from_pretrained; nothing is downloaded. The generated model has random weights,
so its verdicts mean nothing (often all the same label): it shows the mechanics.
Needs the llm extra: pip install "dask-context[llm]".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import dask.bag as db
from distributed import Client, LocalCluster, progress

import dask_context
from dask_context.factcheck import make_claims, verify
from dask_context.models import load_causal_lm, make_model


def main() -> int:
    # the docstring is plain text, shown as written (with its usage examples)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="address of a running Dask scheduler (default: start a LocalCluster)")
    parser.add_argument("--model", metavar="DIR", help="local checkpoint directory (default: generate one)")
    # one convention with python -m dask_context: --claims is a count, a file is --claims-file
    claims_source = parser.add_mutually_exclusive_group()
    claims_source.add_argument("--claims", type=int, default=300, metavar="N",
                               help="how many claims to generate (default: %(default)s)")
    claims_source.add_argument("--claims-file", metavar="PATH",
                               help="verify these claims instead: a text file, one claim per line")
    parser.add_argument("--out", metavar="PATH", help="write verdicts here as JSON lines")
    parser.add_argument("--batch", type=int, default=8, metavar="N",
                        help="claims per task (default: %(default)s)")
    args = parser.parse_args()

    model = args.model or str(make_model(Path(".dask-context-cache") / "model-tiny", "tiny"))
    if args.claims_file:
        claims = Path(args.claims_file).read_text().splitlines()
    else:
        claims = make_claims(args.claims)

    if args.scheduler:
        client = Client(args.scheduler)
    else:
        # process workers with one thread each: dask-context sets torch to one
        # thread per worker thread, so two workers share two cores without fighting
        client = Client(LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0"))

    with client:
        # the context: a name, a loader, its arguments. Nothing loads yet, and
        # registering the same spec again (a second run) changes nothing
        spec = dask_context.ContextSpec("verifier", load_causal_lm, args=[model])
        dask_context.register(client, spec)
        loads_before = dask_context.report(client)["contexts"]["verifier"]["loads"]

        start = time.perf_counter()
        # the tasks built in this block need the model: wherever they are computed,
        # they run on workers that hold it
        with dask_context.use("verifier"):
            batches = db.from_sequence(claims, partition_size=args.batch).map_partitions(verify)
        future = client.compute(batches)
        progress(future)
        verdicts = future.result()
        seconds = time.perf_counter() - start

        info = dask_context.report(client)["contexts"]["verifier"]

    if args.out:
        with open(args.out, "w") as f:
            for v in verdicts:
                f.write(json.dumps(v) + "\n")
        print(f"\nverdicts written to {args.out}")
    for v in verdicts[:3]:
        print(f"{v['verdict']:<16} {v['claim']}")
    print(f"... {len(verdicts)} claims in {seconds:.2f} s, {batches.npartitions} batches of {args.batch}")
    print(f"verdicts: {dict(Counter(v['verdict'] for v in verdicts))}")
    print(f"new model loads: {info['loads'] - loads_before} "
          f"({info['loads']} on this cluster so far, {len(info['warm'])} workers warm)")
    # every claim has exactly one verdict, in order
    return 0 if [v["claim"] for v in verdicts] == claims else 1


if __name__ == "__main__":
    sys.exit(main())
