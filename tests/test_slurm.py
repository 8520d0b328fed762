"""Adaptive scaling from a real SLURM batch system, preemption included.

These tests submit real batch jobs to the one-node SLURM cluster that
``.ci/start-slurm.sh`` starts (``tests/conftest.py`` skips them when ``sinfo`` finds no
node, and fails them when ``DASK_CONTEXT_REQUIRE_SLURM=1``). Each one runs
dask-jobqueue's ``SLURMCluster`` under :class:`dask_context.ContextAdaptive`, one
worker per job, with a generated tiny transformers model as the context, and checks
what the scheduler and SLURM see: jobs, workers, warm contexts, lost and rerun tasks.

Nothing sleeps for a fixed time: conditions are polled, with generous limits because
the CI machine may be busy. Run with ``-o log_cli=true --log-cli-level=INFO`` to see the
measured times.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask_jobqueue.config
import pytest
from dask_jobqueue import SLURMCluster
from distributed import Client, Future, get_worker, wait

import dask_context as dc
from dask_context import preemption
from dask_context.factcheck import judge, make_claims, verify
from dask_context.models import load_causal_lm

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

# How often adapt runs, and for how many consecutive rounds a worker must be suggested
# for retirement before it goes.
INTERVAL = 0.5
WAIT_COUNT = 4

CLAIMS = make_claims(320, seed=7)
BATCHES = [CLAIMS[i : i + 4] for i in range(0, len(CLAIMS), 4)]
# seconds per task in the tests that lose a worker mid-run: the work left must outlast
# a replacement's start-up and load (after the preempting job, where one preempts),
# however busy the machine (with two busy loops alongside, the remaining worker
# finished 0.3 s tasks before the replacement had loaded)
LOSS_TASK_SECONDS = 0.6

_names = itertools.count()


# ---------------------------------------------------------------- task functions
# Workers unpickle these by reference: the job script puts the repository on PYTHONPATH.


def _log_run(runs: str, event: str) -> None:
    """Append ``event key job`` to the shared run log (one short O_APPEND write)."""
    worker = get_worker()
    line = f"{event} {worker.get_current_task()} {os.environ.get('SLURM_JOB_ID', '-')}\n"
    with open(runs, "a") as f:
        f.write(line)


def verify_slowly(claims: list[str], seconds: float, runs: str) -> dict[str, Any]:
    """Task: verdicts from the worker's warm model, as if inference took ``seconds``.

    Returns the verdicts with the worker, its SLURM job and when the task ended, and
    logs each start and end to ``runs`` so that reruns can be counted.
    """
    _log_run(runs, "start")
    verdicts = verify(claims)
    time.sleep(seconds)
    _log_run(runs, "end")
    return {
        "verdicts": verdicts,
        "worker": get_worker().address,
        "job": os.environ.get("SLURM_JOB_ID"),
        "ended": time.time(),
    }


def nap(i: int, seconds: float) -> dict[str, Any]:
    """Task without a context: keeps a worker busy for ``seconds``."""
    time.sleep(seconds)
    return {"i": i, "worker": get_worker().address, "ended": time.time()}


# ---------------------------------------------------------------- observing SLURM


@dataclass
class JobTimes:
    """When one SLURM job was first seen, first seen running, and last seen."""

    seen: float
    running: float | None = None
    gone: float | None = None
    states: list[str] = field(default_factory=list)


class JobWatch:
    """Poll ``squeue`` for the jobs of one job name in a background thread.

    dask-jobqueue does not record when it submitted a job or when SLURM started it,
    so the test records when ``squeue`` first shows each (within one poll, 0.1 s).

    Parameters
    ----------
    name
        The job name (``SLURMCluster(job_name=...)``).
    interval
        Seconds between polls.
    """

    def __init__(self, name: str, interval: float = 0.1):
        self.name = name
        self.interval = interval
        self.jobs: dict[str, JobTimes] = {}
        self.peak_running = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"squeue-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                states = squeue(self.name)
            except (OSError, subprocess.SubprocessError) as exc:  # slurmctld busy
                logger.warning("squeue failed: %s", exc)
                states = None
            now = time.time()
            if states is not None:
                with self._lock:
                    for job, state in states.items():
                        times = self.jobs.setdefault(job, JobTimes(seen=now))
                        times.gone = None
                        if not times.states or times.states[-1] != state:
                            times.states.append(state)
                        if state == "RUNNING" and times.running is None:
                            times.running = now
                    for job, times in self.jobs.items():
                        if job not in states and times.gone is None:
                            times.gone = now
                    running = sum(s == "RUNNING" for s in states.values())
                    self.peak_running = max(self.peak_running, running)
            self._stop.wait(self.interval)

    def snapshot(self) -> dict[str, JobTimes]:
        with self._lock:
            return {job: JobTimes(t.seen, t.running, t.gone, list(t.states)) for job, t in self.jobs.items()}

    def live(self) -> set[str]:
        """Jobs that ``squeue`` listed at the last poll."""
        return {job for job, t in self.snapshot().items() if t.gone is None}


def squeue(name: str) -> dict[str, str]:
    """``{job id: state}`` of the jobs called ``name``."""
    out = subprocess.run(
        ["squeue", "-h", "--name", name, "-o", "%i %T"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def no_jobs(name: str) -> bool:
    return not squeue(name)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something true; return that.

    Raises
    ------
    AssertionError
        Naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- the scheduler's view


def worker_events(client: Client) -> tuple[dict[str, float], dict[str, float]]:
    """When each worker joined and left, from the scheduler's event log."""
    added: dict[str, float] = {}
    removed: dict[str, float] = {}
    for t, event in client.get_events("all"):
        if event.get("action") == "add-worker":
            added.setdefault(event["worker"], t)
        elif event.get("action") == "remove-worker":
            removed.setdefault(event["worker"], t)
    return added, removed


def peak_workers(added: dict[str, float], removed: dict[str, float]) -> int:
    """Most workers connected at once."""
    steps = sorted([(t, 1) for t in added.values()] + [(t, -1) for t in removed.values()])
    return max(itertools.accumulate(step for _, step in steps), default=0)


def context_events(client: Client, action: str) -> dict[str, float]:
    """First time each worker reported ``action`` (hello, loading, loaded) for a context."""
    first: dict[str, float] = {}
    for t, event in client.get_events("dask-context"):
        if event.get("action") == action:
            first.setdefault(event["worker"], t)
    return first


def warm_workers(client: Client, context: str = "verifier") -> list[str]:
    return list(dc.report(client)["contexts"][context]["warm"])


def preempt_one_worker(s: Slurm, workers: set[str], seconds: float) -> str:
    """Submit a ``high`` job one CPU larger than what is free, for ``seconds``; return
    the one worker of ``workers`` that SLURM preempted for it."""
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True)
    subprocess.run(
        ["sbatch", "-p", "high", "-J", f"{s.job_name}-hog", "-c", str(int(cpus.stdout.split()[0]) - 1),
         "--mem=256M", "-t", "2", "-o", "/dev/null", "-e", "/dev/null", "--wrap", f"sleep {seconds:g}"],
        check=True, capture_output=True,
    )
    gone = wait_until(lambda: workers - connected(s.client), 60, "SLURM to preempt a worker job")
    assert len(gone) == 1
    return gone.pop()


def connected(client: Client) -> set[str]:
    return set(client.scheduler_info()["workers"])


def job_of(slurm: Slurm, address: str) -> str:
    """SLURM job id of a connected worker."""
    name = slurm.client.scheduler_info()["workers"][address]["name"]
    return slurm.cluster.workers[name].job_id


@dataclass
class Runs:
    """Task starts and ends read back from the run log, with the jobs they ran in."""

    starts: Counter[str]
    ends: Counter[str]
    started_on: dict[str, set[str]]
    ended_on: dict[str, set[str]]

    @classmethod
    def read(cls, path: Path) -> Runs:
        starts: Counter[str] = Counter()
        ends: Counter[str] = Counter()
        started_on: dict[str, set[str]] = {}
        ended_on: dict[str, set[str]] = {}
        for line in path.read_text().splitlines():
            event, key, job = line.split()
            if event == "start":
                starts[key] += 1
                started_on.setdefault(job, set()).add(key)
            else:
                ends[key] += 1
                ended_on.setdefault(job, set()).add(key)
        return cls(starts, ends, started_on, ended_on)


# ---------------------------------------------------------------- fixtures


@dataclass
class Slurm:
    """One adaptive SLURMCluster with its client, and what the test observes of it."""

    cluster: SLURMCluster
    client: Client
    adaptive: dc.ContextAdaptive
    jobs: JobWatch
    runs: Path
    job_name: str

    def submit(self, batches: list[list[str]], seconds: float, prefix: str = "verify") -> list[Future]:
        """Verification tasks over ``batches``, marked as needing the context."""
        with dc.use("verifier"):
            return self.client.map(
                verify_slowly, batches, seconds=seconds, runs=str(self.runs),
                key=[f"{prefix}-{i}" for i in range(len(batches))],
            )


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model directory, and the verdicts the workers must return for ``BATCHES``.

    Computed here, in the test process, from the same checkpoint: a verdict that came
    back from a worker is correct when it matches.
    """
    from dask_context.models import make_model

    path = make_model(tmp_path_factory.mktemp("slurm-model") / "tiny", preset="tiny")
    model = load_causal_lm(path)
    return {"path": path, "verdicts": [judge(model, batch) for batch in BATCHES]}


@pytest.fixture
def start_slurm(tmp_path: Path, expected: dict[str, Any]) -> Iterator[Callable[..., Slurm]]:
    """Start an adaptive SLURMCluster with the ``verifier`` context registered.

    ``grace`` turns on draining on SIGTERM (:mod:`dask_context.preemption`) with that
    grace; without it, workers die on SIGTERM, as Dask's own do. ``srun`` runs
    each worker in a job step, which gets the SIGTERM that starts a ``GraceTime``
    (the batch script only gets the one at its end).

    Teardown closes the cluster, then cancels whatever is left of its jobs by name and
    waits until ``squeue`` no longer lists them, so that no test leaves jobs behind.
    """
    if "jobqueue" not in dask.config.config:
        # distributed's test helpers (gen_cluster, gen_test) reset dask.config to a
        # snapshot taken before dask_jobqueue added its defaults on import
        dask_jobqueue.config.reconfigure()
    stack = contextlib.ExitStack()
    names: list[str] = []
    # the in-process scheduler logs every worker and client at INFO; keep the live log
    # to this module's measurements
    quiet = logging.getLogger("distributed")
    stack.callback(quiet.setLevel, quiet.level)
    quiet.setLevel(logging.WARNING)

    def start(
        max_jobs: int,
        *,
        queue: str = "debug",
        keep_warm: str = "60s",
        wait_count: int = WAIT_COUNT,
        load_time: str | None = None,
        grace: str | None = None,
        srun: bool = False,
    ) -> Slurm:
        name = f"dask-context-test-{os.getpid()}-{next(_names)}"
        names.append(name)
        stack.enter_context(
            dask.config.set(
                {
                    # a preempted job is replaced 1 s after its worker goes, not 15 s
                    "distributed.deploy.lost-worker-timeout": "1s",
                    # a job starts in ~2 s here; ContextAdaptive replaces the guess
                    # with what it measures
                    "dask-context.adaptive.startup-time": "3s",
                    "dask-context.adaptive.keep-warm": keep_warm,
                }
            )
        )
        watch = JobWatch(name)
        watch.start()
        stack.callback(watch.stop)
        cluster = SLURMCluster(
            cores=1,
            processes=1,
            memory="2GB",
            queue=queue,
            interface="lo",
            job_name=name,
            walltime="00:10:00",
            # the venv running the tests, on the worker too
            python=f"srun {sys.executable}" if srun else sys.executable,
            log_directory=str(tmp_path / "slurm-logs"),
            # the task functions live in this module, which workers import by name
            job_script_prologue=[f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
            scheduler_options={"dashboard_address": ":0"},
            # the default ("error") raises the level of every handler on the
            # 'distributed' logger, and pytest attaches its own there: the measured
            # times logged below would vanish
            silence_logs=False,
        )
        stack.callback(cluster.close)
        client = Client(cluster)
        stack.callback(client.close)
        dc.register(
            client,
            dc.ContextSpec("verifier", load_causal_lm, args=[str(expected["path"])], load_time=load_time),
        )
        if grace is None:
            preemption.disable(client)
        else:
            preemption.enable(client, grace=grace)
        adaptive = cluster.adapt(
            minimum_jobs=0,
            maximum_jobs=max_jobs,
            Adaptive=dc.ContextAdaptive,
            interval=f"{INTERVAL}s",
            wait_count=wait_count,
            target_duration="5s",
        )
        return Slurm(cluster, client, adaptive, watch, tmp_path / f"{name}.runs", name)

    try:
        yield start
    finally:
        stack.close()
        for name in names:
            subprocess.run(["scancel", "--name", name], check=False)
            subprocess.run(["scancel", "--name", f"{name}-hog"], check=False)
        for job_name in [n for name in names for n in (name, f"{name}-hog")]:
            wait_until(functools.partial(no_jobs, job_name), 60, f"jobs {job_name!r} to leave squeue")


# ---------------------------------------------------------------- checks


def check_results(results: list[dict[str, Any]], verdicts: list[list[dict[str, Any]]]) -> None:
    """Each batch's verdicts came back once, in order, and match the local model's."""
    assert len(results) == len(verdicts)
    for got, want in zip(results, verdicts, strict=True):
        assert [v["claim"] for v in got["verdicts"]] == [v["claim"] for v in want]
        assert [v["verdict"] for v in got["verdicts"]] == [v["verdict"] for v in want]
        for g, w in zip(got["verdicts"], want, strict=True):
            assert g["logprob"] == pytest.approx(w["logprob"], rel=1e-4, abs=1e-5)


def wait_done(futures: list[Future], timeout: float = 180) -> list[Any]:
    """Wait for ``futures``, return their results and release them.

    Releasing matters for scale-in: a worker holding results a client still wants is
    kept (like Dask's own ``Adaptive`` does), so the tests that wait for scale-in let go.
    """
    _, not_done = wait(futures, timeout=timeout)
    assert not not_done, f"{len(not_done)} of {len(futures)} tasks unfinished after {timeout} s"
    results = [f.result() for f in futures]
    for f in futures:
        f.release()
    return results


def downs_during(slurm: Slurm, until: float) -> list[dict[str, Any]]:
    """Scale-in decisions adapt carried out before ``until``."""
    return [rec for t, rec in slurm.adaptive.log if rec["status"] == "down" and t < until]


# ---------------------------------------------------------------- tests


@pytest.mark.slurm
def test_adapts_from_zero_to_n_warm_jobs_and_back(start_slurm: Callable[..., Slurm], expected: dict[str, Any]) -> None:
    keep_warm = 2.0
    s = start_slurm(max_jobs=3, keep_warm=f"{keep_warm}s")
    assert not connected(s.client) and not squeue(s.job_name)  # from zero

    batches = BATCHES[:60]
    futures = s.submit(batches, seconds=0.4)
    keys = {f.key for f in futures}
    results = wait_done(futures)
    check_results(results, expected["verdicts"][:60])

    # scaled out (to the maximum on a quiet machine; a busy one may finish the work
    # before the last job starts), one load per worker that served, nothing left
    added, removed = worker_events(s.client)
    served = Counter(r["worker"] for r in results)
    assert 2 <= peak_workers(added, removed) <= 3
    assert s.jobs.peak_running <= 3
    assert len(served) >= 2
    info = dc.report(s.client)["contexts"]["verifier"]
    assert len(served) <= info["loads"] <= peak_workers(added, removed)
    assert info["tasks"] >= len(keys) and info["queued"] == 0
    assert set(served) <= set(info["warm"])
    # no worker was retired while work remained (the target holds during first loads)
    assert not downs_during(s, max(r["ended"] for r in results))
    # back to zero once idle: no worker, no job
    wait_until(lambda: not connected(s.client), 60, "adapt to retire every worker")
    wait_until(lambda: not squeue(s.job_name), 30, "every job to leave squeue")
    added, removed = worker_events(s.client)
    last_task = {w: max(r["ended"] for r in results if r["worker"] == w) for w in served}
    # warm workers stayed while their context had work, and keep-warm after their last task
    assert min(removed[w] for w in served) > max(last_task.values())
    for w, ended in last_task.items():
        assert removed[w] - ended >= keep_warm, (w, removed[w] - ended)

    # the measured path from a scale-up request to a warm worker
    asked = next(t for t, rec in s.adaptive.log if rec["status"] == "up")
    jobs = s.jobs.snapshot()
    hello = context_events(s.client, "hello")
    loaded = context_events(s.client, "loaded")
    # the first worker to load (one that was retired cold never served, nor loaded)
    first = min(loaded, key=lambda w: loaded[w])
    job = next(r["job"] for r in results if r["worker"] == first)
    logger.info(
        "scale-up request -> job in squeue %.2f s -> running %.2f s -> worker connected "
        "%.2f s -> dask-context ready %.2f s -> context loaded %.2f s (first of %d workers; "
        "all %d warm after %.2f s); ContextAdaptive now assumes %.1f s start-up; %d jobs "
        "submitted for %d that served; %d workers retired while work remained",
        jobs[job].seen - asked, (jobs[job].running or math.nan) - asked, added[first] - asked,
        hello[first] - asked, loaded[first] - asked, len(added), len(loaded),
        max(loaded.values()) - asked, s.adaptive.startup_time, len(jobs), len(served),
        sum(len(rec["workers"]) for rec in downs_during(s, max(r["ended"] for r in results))),
    )
    logger.info(
        "scale-in: last task -> worker retired %s s (keep-warm %.0f s, hold %.1f s)",
        ", ".join(f"{removed[w] - t:.1f}" for w, t in last_task.items()), keep_warm,
        INTERVAL * WAIT_COUNT,
    )


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["scancel", "preempt"])
def test_lost_worker_job_loses_no_result(
    start_slurm: Callable[..., Slurm], expected: dict[str, Any], how: str
) -> None:
    # "preempt": the workers run in the preemptable 'scavenger' partition and a job
    # in 'high' takes the CPUs of one of them, as on a shared production cluster.
    # The workers do not drain on the warning here (tests/test_slurm_drain.py: they do)
    s = start_slurm(max_jobs=2, queue="scavenger" if how == "preempt" else "debug")
    futures = s.submit(BATCHES, seconds=LOSS_TASK_SECONDS)
    keys = {f.key for f in futures}
    wait_until(
        lambda: len(warm_workers(s.client)) == 2 and sum(f.done() for f in futures) >= 8,
        120, "two warm workers with work under way",
    )
    before = connected(s.client)
    job_by_worker = {w: job_of(s, w) for w in before}
    jobs_before = set(s.jobs.snapshot())
    killed_at = time.time()
    if how == "scancel":
        victim = warm_workers(s.client)[0]
        subprocess.run(["scancel", job_by_worker[victim]], check=True)
    else:
        victim = preempt_one_worker(s, before, seconds=6)

    results = wait_done(futures)
    check_results(results, expected["verdicts"])
    runs = Runs.read(s.runs)
    assert set(runs.ends) == keys
    added, removed = worker_events(s.client)
    assert victim in removed and victim not in connected(s.client)

    # only tasks of the lost worker ran again: those it was running and the results
    # it held (the client still wanted them); everything else ran once
    rerun = {k for k, n in runs.starts.items() if n > 1}
    assert rerun, "the lost worker was running or holding no task"
    assert rerun <= runs.started_on[job_by_worker[victim]], "a task that never ran on the lost worker reran"
    assert dc.report(s.client)["contexts"]["verifier"]["requeued"] >= 1

    # adapt replaced the lost job, and the replacement became a warm worker
    jobs = s.jobs.snapshot()
    new = [j for j in jobs if j not in jobs_before]
    assert new, "adapt did not submit a replacement job"
    replacement = min(new, key=lambda j: jobs[j].seen)
    loaded = context_events(s.client, "loaded")
    late = [w for w, t in added.items() if t > killed_at]
    assert late, "no worker joined after the loss"
    new_worker = min(late, key=lambda w: added[w])
    assert new_worker in loaded, "the replacement never loaded the context"
    logger.info(
        "%s: worker left the scheduler after %.2f s; replacement job in squeue after %.2f s, "
        "running after %.2f s, worker connected after %.2f s, context loaded after %.2f s; "
        "%d task starts for %d tasks (%d reran: %d results lost with the worker, "
        "%d killed mid-run); the replacement served %d tasks",
        how, removed[victim] - killed_at, jobs[replacement].seen - killed_at,
        (jobs[replacement].running or math.nan) - killed_at, added[new_worker] - killed_at,
        loaded[new_worker] - killed_at, sum(runs.starts.values()), len(keys), len(rerun),
        sum(1 for k in rerun if runs.ends[k] > 1), sum(runs.starts[k] - runs.ends[k] for k in rerun),
        sum(r["worker"] == new_worker for r in results),
    )


@pytest.mark.slurm
def test_scale_in_retires_cold_workers_first_and_keeps_warm_ones(
    start_slurm: Callable[..., Slurm], expected: dict[str, Any]
) -> None:
    keep_warm = 8.0
    # a short hold: cold workers may go as soon as they are idle. The load-time hint
    # keeps the few context tasks on one worker until a load has been measured.
    s = start_slurm(max_jobs=2, keep_warm=f"{keep_warm}s", wait_count=3, load_time="30s")
    # plain tasks make adapt start two workers; only one of them is given the context
    plain = s.client.map(nap, range(24), seconds=0.5, key=[f"nap-{i}" for i in range(24)])
    futures = s.submit(BATCHES[:4], seconds=0.2)
    results = wait_done(futures)
    check_results(results, expected["verdicts"][:4])
    naps = wait_done(plain)

    added, removed = worker_events(s.client)
    assert peak_workers(added, removed) == 2
    (warm,) = {r["worker"] for r in results}
    assert warm_workers(s.client) == [warm]
    (cold,) = set(added) - {warm}
    assert any(n["worker"] == cold for n in naps)  # it did work, just no context work

    # the cold worker goes first; the warm one is still there, warm, when it does
    wait_until(lambda: cold not in connected(s.client), 60, "the cold worker to be retired")
    assert warm in connected(s.client)
    assert warm_workers(s.client) == [warm]
    assert dc.report(s.client)["workers"][warm]["resident"].keys() == {"verifier"}

    # the warm one goes once it has been idle for keep-warm, and not before
    wait_until(lambda: warm not in connected(s.client), 60, "the warm worker to be retired")
    wait_until(lambda: not squeue(s.job_name), 30, "every job to leave squeue")
    added, removed = worker_events(s.client)
    last_context_task = max(r["ended"] for r in results)
    assert removed[cold] < removed[warm]
    assert removed[warm] - last_context_task >= keep_warm
    logger.info(
        "scale-in: cold worker retired %.1f s after the last task, warm worker %.1f s after "
        "its last context task (keep-warm %.0f s)",
        removed[cold] - max(n["ended"] for n in naps), removed[warm] - last_context_task, keep_warm,
    )


@pytest.mark.slurm
def test_example_runs_to_completion(tmp_path: Path) -> None:
    # CI runs the notebook-style example here, against the same SLURM
    example = ROOT / "examples" / "adaptive_slurm.py"
    proc = subprocess.run(
        [sys.executable, str(example)], cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"{example.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.rstrip().endswith("OK")
    logger.info("%s:\n%s", example.name, proc.stdout)
