# %% [markdown]
# # Fact verification on an adaptive SLURM cluster
#
# A notebook-style script (cells separated by `# %%`; open it in Jupyter with jupytext,
# in VS Code, or run it with `python examples/adaptive_slurm.py`).
#
# dask-jobqueue's `SLURMCluster` starts with no job at all. `ContextAdaptive` asks SLURM
# for worker jobs when context work is queued, each worker loads the model once, the
# scheduler sends the verification tasks to the warm workers, and when the work is done
# the jobs are given back, cold workers first, warm ones after `keep-warm`. Half-way, a
# worker job is cancelled with `scancel`, as a preemption would: nothing is lost, and
# adapt replaces the job.
#
# It needs a SLURM cluster that runs jobs on this machine (`sudo .ci/start-slurm.sh`
# starts a one-node one) and the llm extra (`pip install "dask-context[llm]"`), and
# exits non-zero when anything goes wrong.

# %%
from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import dask
import dask.bag as db
from dask_jobqueue import SLURMCluster
from distributed import Client

import dask_context
from dask_context.factcheck import make_claims, verify
from dask_context.models import load_causal_lm, make_model

# --help describes the script and exits before anything starts; unknown arguments
# are left alone (a Jupyter kernel passes its own)
argparse.ArgumentParser(
    description="Fact verification on an adaptive SLURM cluster: ContextAdaptive scales "
    "worker jobs from zero, each worker loads the model once, a preempted job is "
    "replaced and nothing is lost, and the cluster scales back to zero. Needs a "
    "SLURM cluster that runs jobs on this machine (sudo .ci/start-slurm.sh starts a "
    "one-node one). Exits non-zero when anything goes wrong.",
).parse_known_args()

logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

JOB_NAME = f"dask-context-example-{os.getpid()}"
MAX_JOBS = 3
KEEP_WARM = 5.0  # seconds a warm worker stays idle before it may go
# The tiny model answers in milliseconds. This makes each batch take as long as a real
# model's inference would, so that there is something to scale out for.
SECONDS_PER_BATCH = 0.4


def fail(message: str) -> NoReturn:
    """Stop the example with a clear message and a non-zero exit status."""
    print(f"adaptive_slurm.py: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def squeue() -> dict[str, str]:
    """``{job id: state}`` of this example's jobs."""
    out = subprocess.run(
        ["squeue", "-h", "--name", JOB_NAME, "-o", "%i %T"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


# %% [markdown]
# ## Is there a SLURM cluster?

# %%
if shutil.which("sinfo") is None:
    fail("`sinfo` is not on PATH: this example needs SLURM (start a one-node cluster "
         "with `sudo .ci/start-slurm.sh`)")
nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %c"], capture_output=True, text=True)
if nodes.returncode != 0 or not any(s in nodes.stdout for s in ("idle", "mixed", "alloc")):
    fail(f"`sinfo` finds no usable node ({(nodes.stdout + nodes.stderr).strip() or 'no output'}); "
         "is slurmctld running? `sudo .ci/start-slurm.sh` starts one")
print("SLURM nodes:", ", ".join(sorted(set(nodes.stdout.split("\n")) - {""})))
# whatever happens below, leave no job behind
atexit.register(subprocess.run, ["scancel", "--name", JOB_NAME], check=False)

# %% [markdown]
# ## A model to verify claims with
#
# A small random Llama-style checkpoint that the project generates (nothing is
# downloaded). With a real model, point `load_causal_lm` at its directory instead.

# %%
workdir = Path(tempfile.mkdtemp(prefix="dask-context-example-"))
model_dir = make_model(workdir / "tiny", preset="tiny")
claims = make_claims(480, seed=1)


def verify_batch(batch: list[str]) -> list[dict[str, Any]]:
    """Verdicts for a batch of claims from the worker's warm model."""
    verdicts = verify(batch)  # dask_context.get_context("verifier") inside
    time.sleep(SECONDS_PER_BATCH)
    return verdicts


# %% [markdown]
# ## An adaptive SLURMCluster
#
# One worker per job (`cores=1, processes=1`). The settings that matter for adaptive
# scaling with contexts:
#
# * `distributed.deploy.lost-worker-timeout`: how long after a worker's job disappears
#   (preempted, cancelled, walltime) it is replaced. The default, 15 s, is long.
# * `dask-context.adaptive.keep-warm`: how long an idle warm worker is kept.
# * `dask-context.adaptive.startup-time`: the first guess of a job's start-up time;
#   `ContextAdaptive` replaces it with what it measures.
# * `interval` x `wait_count` of `adapt`: how long a worker must look superfluous
#   before it goes. Keep it longer than one load of the model (see
#   docs/adaptive-slurm.md).

# %%
dask.config.set(
    {
        "distributed.deploy.lost-worker-timeout": "1s",
        "dask-context.adaptive.keep-warm": f"{KEEP_WARM}s",
        "dask-context.adaptive.startup-time": "5s",
    }
)
cluster = SLURMCluster(
    cores=1,
    processes=1,
    memory="2GB",
    walltime="00:15:00",
    job_name=JOB_NAME,
    interface="lo",  # a one-machine cluster; on a real one use the nodes' network
    log_directory=str(workdir / "logs"),
    scheduler_options={"dashboard_address": ":0"},
)
client = Client(cluster)
dask_context.register(client, dask_context.ContextSpec("verifier", load_causal_lm, args=[str(model_dir)]))
adaptive = cluster.adapt(
    minimum_jobs=0,
    maximum_jobs=MAX_JOBS,
    Adaptive=dask_context.ContextAdaptive,
    interval="500ms",
    wait_count=12,
    target_duration="5s",
)
print("dashboard:", client.dashboard_link)
if squeue() or client.scheduler_info()["workers"]:
    fail("the cluster should start without jobs")

# %% [markdown]
# ## Verify 480 claims: from zero jobs to warm workers
#
# The loop only watches `squeue` to time the jobs; `bag.compute()` alone would do.

# %%
jobs: dict[str, dict[str, float]] = {}


def watch(done: Any, timeout: float = 180) -> None:
    """Until ``done()``, record when each job is first seen in squeue, and running."""
    deadline = time.time() + timeout
    while not done():
        if time.time() > deadline:
            fail(f"the computation did not finish within {timeout:.0f} s")
        now = time.time()
        for job, state in squeue().items():
            jobs.setdefault(job, {"seen": now})
            if state == "RUNNING":
                jobs[job].setdefault("running", now)
        time.sleep(0.1)


started = time.time()
bag = db.from_sequence(claims, partition_size=8)
with dask_context.use("verifier"):  # or build the bag inside use(): either marks it
    future = client.compute(bag.map_partitions(verify_batch))
watch(future.done)
verdicts = future.result()
first_run = time.time() - started
# Release results once they are here. A worker holding results that a client still
# references is retired all the same when no other worker can take them; the results
# are lost and recomputed on new jobs (see docs/adaptive-slurm.md).
future.release()
if [v["claim"] for v in verdicts] != claims:
    fail("verdicts are missing, duplicated or out of order")


def events(topic: str, action: str) -> dict[str, float]:
    """When each worker first logged ``action`` on the scheduler."""
    first: dict[str, float] = {}
    for t, event in client.get_events(topic):
        if event.get("action") == action:
            first.setdefault(event["worker"], t)
    return first


asked = next(t for t, rec in adaptive.log if rec["status"] == "up")
joined = events("all", "add-worker")
loaded = events("dask-context", "loaded")
if not loaded:
    fail("no worker loaded the model")
first_worker = min(loaded, key=lambda w: loaded[w])  # the first to be warm
first_job = jobs[cluster.workers[client.scheduler_info()["workers"][first_worker]["name"]].job_id]
report = dask_context.report(client)["contexts"]["verifier"]
print(f"\n1. {len(claims)} claims verified in {first_run:.1f} s, starting from zero jobs")
steps = [
    ("job in squeue", first_job["seen"]),
    ("job running", first_job.get("running", float("nan"))),
    ("worker connected", joined[first_worker]),
    ("model loaded", loaded[first_worker]),
]
for i, (step, t) in enumerate(steps):
    print(f"   {'scale-up request ->' if i == 0 else '->':>19} {step:<16} {t - asked:5.2f} s")
print(f"   {len(loaded)} warm workers after {max(loaded.values()) - asked:.2f} s; {len(jobs)} jobs "
      f"submitted; {report['loads']} model loads; "
      f"ContextAdaptive measured a {adaptive.startup_time:.1f} s start-up")

# %% [markdown]
# ## Again, while the workers are warm
#
# Within `keep-warm` the next computation finds the model loaded: no new job, no new
# load.

# %%
loads_before = report["loads"]
started = time.time()
with dask_context.use("verifier"):
    again = db.from_sequence(claims[:96], partition_size=8).map_partitions(verify_batch).compute()
second_run = time.time() - started
report = dask_context.report(client)["contexts"]["verifier"]
def answers(vs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(v["claim"], v["verdict"]) for v in vs]


if answers(again) != answers(verdicts[:96]):
    fail("the warm workers gave different verdicts")
if report["loads"] != loads_before:
    fail(f"warm workers loaded the model again ({report['loads']} loads, {loads_before} before)")
print(f"\n2. {len(again)} more claims in {second_run:.1f} s on {len(report['warm'])} warm workers, "
      f"no new load")

# %% [markdown]
# ## A worker job is preempted mid-run
#
# `scancel` ends one warm worker's job while verification runs. Its running task and
# the results it held are recomputed elsewhere, and adapt submits a replacement job
# `lost-worker-timeout` later.

# %%
batches = [claims[i : i + 8] for i in range(0, len(claims), 8)]
before = dask_context.report(client)["contexts"]["verifier"]
with dask_context.use("verifier"):
    futures = client.map(verify_batch, batches, key=[f"preempted-run-{i}" for i in range(len(batches))])
deadline = time.time() + 120
while sum(f.done() for f in futures) < 10 or not dask_context.report(client)["contexts"]["verifier"]["warm"]:
    if time.time() > deadline:
        fail("no warm worker made progress within 120 s")
    time.sleep(0.1)
victim = dask_context.report(client)["contexts"]["verifier"]["warm"][0]
victim_job = cluster.workers[client.scheduler_info()["workers"][victim]["name"]].job_id
jobs_before = set(jobs)
killed = time.time()
subprocess.run(["scancel", victim_job], check=True)
watch(lambda: all(f.done() for f in futures))
rerun_verdicts = [v for batch in client.gather(futures) for v in batch]
if answers(rerun_verdicts) != answers(verdicts):
    fail("results after the preemption differ from the first run's")
report = dask_context.report(client)["contexts"]["verifier"]
joined = events("all", "add-worker")
left = events("all", "remove-worker")
replacements = sorted(t for w, t in joined.items() if t > killed)
if victim not in left:
    fail("the cancelled worker is still connected")
print(f"\n3. job {victim_job} cancelled mid-run: all {len(futures)} batches correct, each once")
print(f"   worker gone from the scheduler after {left[victim] - killed:.2f} s; "
      f"{report['requeued'] - before['requeued']} running tasks went back to the queue and "
      f"{report['tasks'] - before['tasks'] - len(futures)} finished results it held were recomputed")
new_jobs = sorted(set(jobs) - jobs_before, key=lambda j: jobs[j]["seen"])
if replacements and new_jobs:
    print(f"   replacement job in squeue {jobs[new_jobs[0]]['seen'] - killed:.2f} s after the "
          f"scancel, worker connected after {replacements[0] - killed:.2f} s")
else:
    print("   no replacement was needed: the work finished first")
for f in futures:
    f.release()  # results no one holds can go with their workers

# %% [markdown]
# ## Back to zero
#
# Once idle, cold workers go first and warm ones after `keep-warm`; the jobs leave
# the queue.

# %%
idle_from = time.time()
deadline = idle_from + 120
while client.scheduler_info()["workers"] or squeue():
    if time.time() > deadline:
        fail("the cluster did not scale back to zero within 120 s")
    time.sleep(0.2)
print(f"\n4. scaled back to zero jobs {time.time() - idle_from:.1f} s after the last result "
      f"(keep-warm {KEEP_WARM:.0f} s + {0.5 * 12:.0f} s of adapt's wait_count)")

# %%
client.close()
cluster.close()
shutil.rmtree(workdir, ignore_errors=True)
print("\nOK")
