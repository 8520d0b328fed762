"""Resumable runs (dask_context.resume): stored partitions are read, not computed.

The kill tests run a real script in a subprocess, SIGKILL it (or the scheduler of a
``dask scheduler`` deployment) once the ledger holds about half the partitions, run
it again, and count every item computed and every context load over both runs.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dask
import dask.bag as db
import psutil
import pytest
from distributed import Client, LocalCluster

import dask_context
from dask_context import resume
from dask_context.resume import CorruptPartitionError, plan, resumable
from tests.loaders import blob, use_context

ROOT = Path(__file__).resolve().parents[1]
N, PARTITIONS = 80, 20  # 4 items a partition

SCRIPT = f'''
import json, os, sys, time
import dask.bag as db
from distributed import Client, LocalCluster
import dask_context

ledger, counts, run, out, scheduler_file = sys.argv[1:6]
N, P = {N}, {PARTITIONS}

def load_model(counts, run):
    with open(os.path.join(counts, f"loads-{{run}}"), "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    return {{"w": 3}}

def score(x, counts):
    m = dask_context.get_context("model")
    time.sleep(0.05)
    with open(os.path.join(counts, "items"), "a") as f:
        f.write(f"{{x}}\\n")
    return {{"item": x, "score": x * m["w"]}}

if __name__ == "__main__":
    if scheduler_file == "-":
        client = Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     dashboard_address=":0"))
    else:
        client = Client(scheduler_file=scheduler_file)
    dask_context.register(client, dask_context.ContextSpec("model", load_model, args=[counts, run]))
    with dask_context.use("model"):
        scores = db.from_sequence(range(N), npartitions=P).map(score, counts)
    result = dask_context.resumable(scores, ledger).compute()
    with open(out, "w") as f:
        json.dump(result, f)
'''

EXPECTED = [{"item": x, "score": 3 * x} for x in range(N)]


# ---------------------------------------------------------------- helpers
def square_all(part: list) -> list:
    return [x * x for x in part]


SUMMARISED: list[int] = []
SQUARED: list[int] = []


def counted_squares(part: list) -> list:
    SQUARED.append(len(part))  # a global it updates is not part of its identity
    return square_all(part)


@dask.delayed  # impure: a random key every call, resumed all the same
def summarise(part: list) -> dict:
    SUMMARISED.append(1)
    return {"n": len(part), "sum": sum(part)}


class Flaky:
    """A task function that fails on items >= ``fail_from`` while armed (a run
    killed halfway), and counts what it computes."""

    def __init__(self, fail_from: int):
        self.fail_from = fail_from
        self.armed = True
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, x: int) -> int:
        if self.armed and x >= self.fail_from:
            raise RuntimeError("killed")
        with self.lock:
            self.calls.append(x)
        return x * 10

    def __dask_tokenize__(self):
        return ("Flaky", self.fail_from)  # the same function whether armed or not


def count(path: Path) -> collections.Counter:
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


def stored(ledger: Path) -> int:
    try:
        return len(os.listdir(ledger / "parts"))
    except FileNotFoundError:
        return 0


def descendants(pid: int) -> set[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    return set()


def wait_gone(pids: set[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(max(0.1, deadline - time.monotonic()))


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


# ---------------------------------------------------------------- in-process
def test_a_run_stopped_halfway_computes_only_the_rest(tmp_path):
    f = Flaky(fail_from=40)
    bag = db.from_sequence(range(80), npartitions=20).map(f)
    with pytest.raises(RuntimeError, match="killed"):
        resumable(bag, tmp_path).compute(scheduler="sync")
    p = plan(bag, tmp_path)
    assert all(x < 40 for x in f.calls) and len(f.calls) == 4 * len(p.done) > 0
    assert (len(p.done) + len(p.todo), p.torn) == (20, [])
    f.armed = False
    out = resumable(bag, tmp_path).compute(scheduler="sync")
    assert out == [x * 10 for x in range(80)]
    assert sorted(f.calls) == list(range(80))  # each item once over both runs
    assert resumable(bag, tmp_path).compute(scheduler="sync") == out
    assert sorted(f.calls) == list(range(80))


def test_delayed_dataframes_and_lists_of_collections(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import dask.dataframe as dd

    calls = SUMMARISED
    calls.clear()
    parts = [summarise(list(range(i, i + 3))) for i in range(0, 9, 3)]
    first = dask.compute(*resumable(parts, tmp_path), scheduler="sync")
    again = dask.compute(*resumable([summarise(list(range(i, i + 3))) for i in range(0, 9, 3)],
                                    tmp_path), scheduler="sync")
    assert first == again and len(calls) == 3

    frame = pd.DataFrame({"x": range(12), "name": [f"n{i}" for i in range(12)]})
    df = dd.from_pandas(frame, npartitions=4).map_partitions(lambda d: d.assign(y=d.x * 1.5))
    expected = df.compute(scheduler="sync")
    pd.testing.assert_frame_equal(resumable(df, tmp_path).compute(scheduler="sync"), expected)
    assert len(plan(df, tmp_path).done) == 4
    pd.testing.assert_frame_equal(resumable(df, tmp_path).compute(scheduler="sync"), expected)
    series = df.y + 1
    resumable(series, tmp_path).compute(scheduler="sync")
    pd.testing.assert_series_equal(resumable(series, tmp_path).compute(scheduler="sync"),
                                   series.compute(scheduler="sync"))
    files = resume.stored_files(df, str(tmp_path))
    assert all(f.endswith(".parquet") for f in files)
    pd.testing.assert_frame_equal(pd.concat(pd.read_parquet(f) for f in files), expected)


def test_formats_parquet_for_records_pickle_for_the_rest(tmp_path):
    pytest.importorskip("pyarrow")
    records = db.from_sequence([{"id": i, "text": str(i)} for i in range(6)], npartitions=2)
    mixed = db.from_sequence([{"v": 1}, {"v": 2.5}, (1, 2)], npartitions=1)  # not lossless in Parquet
    for bag in (records, mixed):
        assert resumable(bag, tmp_path).compute(scheduler="sync") == bag.compute(scheduler="sync")
        assert resumable(bag, tmp_path).compute(scheduler="sync") == bag.compute(scheduler="sync")
    exts = collections.Counter(n.rpartition(".")[2] for n in os.listdir(tmp_path / "parts"))
    assert exts == {"parquet": 2, "pkl": 1}
    with pytest.raises(TypeError, match="format='parquet'"):
        resumable(mixed, tmp_path / "p", format="parquet").compute(scheduler="sync")


def test_a_changed_input_or_function_is_computed_afresh(tmp_path, monkeypatch):
    module = tmp_path / "edited_task.py"
    module.write_text("def step(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("edited_task")
    ledger = tmp_path / "ledger"
    bag = db.from_sequence(range(8), npartitions=4).map(mod.step)
    assert resumable(bag, ledger).compute(scheduler="sync") == list(range(1, 9))
    assert len(plan(bag, ledger).done) == 4
    # same input, same function name, new body: Dask's key is unchanged, the identity is not
    module.write_text("def step(x):\n    return x + 2\n")
    mod = importlib.reload(mod)
    bag2 = db.from_sequence(range(8), npartitions=4).map(mod.step)
    assert bag2.__dask_keys__() == bag.__dask_keys__()
    assert len(plan(bag2, ledger).done) == 0
    assert resumable(bag2, ledger).compute(scheduler="sync") == list(range(2, 10))
    # one changed partition of input: only that one is computed
    bag3 = db.from_sequence([*range(7), 100], npartitions=4).map(mod.step)
    assert (len(plan(bag3, ledger).done), len(plan(bag3, ledger).todo)) == (3, 1)
    assert len(plan(bag2, ledger, token="model-v2").done) == 0  # token: what the graph cannot see


def test_torn_and_corrupt_files_are_recomputed_and_reported(tmp_path):
    calls = SQUARED
    calls.clear()
    bag = db.from_sequence(range(12), npartitions=4).map_partitions(counted_squares)
    expected = resumable(bag, tmp_path, format="pickle").compute(scheduler="sync")
    files = sorted((tmp_path / "parts").iterdir())
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # truncated
    calls.clear()
    p = plan(bag, tmp_path)  # also logs a warning that names the file
    assert p.torn == [files[0].name] and len(p.todo) == 1
    assert (tmp_path / "corrupt" / files[0].name).exists()
    assert resumable(bag, tmp_path).compute(scheduler="sync") == expected and len(calls) == 1

    # same size, flipped bytes: a size check passes, the checksum on read does not
    files = sorted((tmp_path / "parts").iterdir())
    data = bytearray(files[1].read_bytes())
    data[-3] ^= 0xFF
    files[1].write_bytes(bytes(data))
    calls.clear()
    with pytest.raises(CorruptPartitionError, match="next run computes it again"):
        resumable(bag, tmp_path).compute(scheduler="sync")
    assert resumable(bag, tmp_path).compute(scheduler="sync") == expected and len(calls) == 1
    # verify="checksum" finds it before the run
    files = sorted((tmp_path / "parts").iterdir())
    data = bytearray(files[2].read_bytes())
    data[-3] ^= 0xFF
    files[2].write_bytes(bytes(data))
    assert len(plan(bag, tmp_path, verify="checksum").torn) == 1
    assert resumable(bag, tmp_path).compute(scheduler="sync") == expected


def test_two_runs_writing_one_ledger_at_once(tmp_path):
    bag = db.from_sequence(range(200), npartitions=40).map_partitions(square_all)
    expected = bag.compute(scheduler="sync")
    results = []
    # two "runs" at once: each with its own graph and 4 threads, storing the same entries
    runs = [threading.Thread(target=lambda: results.append(
        resumable(bag, tmp_path).compute(scheduler="threads", num_workers=4))) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert results == [expected, expected]
    assert os.listdir(tmp_path / "tmp") == []  # every temporary file was renamed into place
    p = plan(bag, tmp_path, verify="checksum")
    assert (len(p.done), p.torn) == (40, [])
    assert resumable(bag, tmp_path).compute(scheduler="sync") == expected


def test_routed_runs_route_only_what_is_left_and_load_nothing_when_done(tmp_path):
    def run(fail_from: int | None) -> tuple[list, dict]:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            dask_context.register(client, dask_context.ContextSpec("m", blob, args=["m"]))
            with dask_context.use("m"):
                bag = db.from_sequence(range(12), npartitions=6).map(use_context, "m")
            if fail_from is not None:  # as if the first run had stopped after 3 partitions
                dask.compute(resumable(bag.to_delayed(optimize_graph=False)[:3], tmp_path))
            out = resumable(bag, tmp_path).compute()
            return [x[1] for x in out], dask_context.report(client)["contexts"]["m"]

    out, ctx = run(fail_from=3)
    assert out == list(range(12))
    assert ctx["tasks"] == 3 + 3  # the first "run" routed 3 partitions, the second the other 3
    out, ctx = run(None)
    assert out == list(range(12)) and (ctx["loads"], ctx["tasks"]) == (0, 0)


# ---------------------------------------------------------------- kill for real
def _start_script(tmp_path: Path, run: int, scheduler_file: str = "-") -> subprocess.Popen:
    script = tmp_path / "pipeline.py"
    script.write_text(SCRIPT)
    (tmp_path / "counts").mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ledger"), str(tmp_path / "counts"),
         str(run), str(tmp_path / f"out{run}.json"), scheduler_file],
        env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_half(proc: subprocess.Popen, ledger: Path, watch: int | None = None,
                   timeout: float = 120) -> set[int]:
    """Wait until the ledger holds half the partitions; the processes seen under
    ``watch`` (the script's, by default) meanwhile."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while stored(ledger) < PARTITIONS // 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run made no progress"
        pids |= descendants(watch or proc.pid)
        time.sleep(0.01)
    return pids


def _check_counts(tmp_path: Path, lost_partitions: int) -> collections.Counter:
    items = count(tmp_path / "counts" / "items")
    assert set(items) == {str(x) for x in range(N)}
    twice = [int(x) for x, n in items.items() if n > 1]
    assert all(n <= 2 for n in items.values())
    # only items of partitions that were running when their worker died can be computed
    # twice, at most one partition per worker thread
    assert len({x // (N // PARTITIONS) for x in twice}) <= lost_partitions, twice
    assert json.loads((tmp_path / "out2.json").read_text()) == EXPECTED
    return items


def test_sigkill_the_client_halfway_then_run_again(tmp_path):
    ledger = tmp_path / "ledger"
    first = _start_script(tmp_path, 1)
    workers = _wait_for_half(first, ledger)
    first.send_signal(signal.SIGKILL)
    first.wait()
    wait_gone(workers)  # LocalCluster's workers exit with the process that started them
    done_first = stored(ledger)
    assert PARTITIONS // 2 <= done_first < PARTITIONS
    computed_first = sum(count(tmp_path / "counts" / "items").values())
    second = _start_script(tmp_path, 2)
    assert second.wait(120) == 0, second.stderr.read()
    items = _check_counts(tmp_path, lost_partitions=2)
    assert stored(ledger) == PARTITIONS
    # every stored partition of the first run was read, not computed, by the second
    assert sum(items.values()) - computed_first == N - done_first * (N // PARTITIONS)
    loads = {run: len(count(tmp_path / "counts" / f"loads-{run}")) for run in (1, 2)}
    assert loads[1] in (1, 2) and loads[2] in (1, 2)
    print(f"client killed with {done_first}/{PARTITIONS} partitions stored; items computed "
          f"{sum(items.values())} for {N} ({sum(n > 1 for n in items.values())} twice); loads {loads}")
    # nothing left: no context loads, nothing computed
    third = _start_script(tmp_path, 3)
    assert third.wait(120) == 0, third.stderr.read()
    assert not (tmp_path / "counts" / "loads-3").exists()
    assert sum(count(tmp_path / "counts" / "items").values()) == sum(items.values())
    assert json.loads((tmp_path / "out3.json").read_text()) == EXPECTED


def _deployment(tmp_path: Path, name: str) -> list[subprocess.Popen]:
    sf = tmp_path / f"{name}.json"
    sf.unlink(missing_ok=True)
    log = open(tmp_path / f"{name}.log", "w")
    procs = [subprocess.Popen(["dask", "scheduler", "--scheduler-file", str(sf), "--host", "127.0.0.1",
                               "--port", "0", "--dashboard-address", ":0"],
                              env=env(), stdout=log, stderr=log)]
    deadline = time.monotonic() + 60
    while not sf.exists():
        assert time.monotonic() < deadline and procs[0].poll() is None, "no scheduler"
        time.sleep(0.1)
    for _ in range(2):
        procs.append(subprocess.Popen(["dask", "worker", "--scheduler-file", str(sf), "--nthreads", "1",
                                       "--no-dashboard", "--host", "127.0.0.1"],
                                      env=env(), stdout=log, stderr=log))
    with Client(scheduler_file=str(sf), timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
    return procs


def test_sigkill_the_scheduler_halfway_then_run_again(tmp_path):
    ledger = tmp_path / "ledger"
    procs = _deployment(tmp_path, "first")
    try:
        first = _start_script(tmp_path, 1, str(tmp_path / "first.json"))
        _wait_for_half(first, ledger)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        # the workers run out the tasks they hold (each stores its partition) and stay,
        # waiting for a scheduler; the script waits too
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 2:
            if stored(ledger) != last:
                last, since = stored(ledger), time.monotonic()
            time.sleep(0.1)
    finally:
        for p in procs[1:]:
            p.terminate()
        first.kill()
        for p in procs:
            p.wait(30)
        first.wait()
    done_first = stored(ledger)
    assert PARTITIONS // 2 <= done_first < PARTITIONS
    procs = _deployment(tmp_path, "second")
    try:
        second = _start_script(tmp_path, 2, str(tmp_path / "second.json"))
        assert second.wait(120) == 0, second.stderr.read()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    items = _check_counts(tmp_path, lost_partitions=0)
    assert sum(items.values()) == N  # workers outlive their scheduler: nothing is lost
    loads = {run: len(count(tmp_path / "counts" / f"loads-{run}")) for run in (1, 2)}
    assert loads[1] in (1, 2) and loads[2] in (1, 2)
    print(f"scheduler killed, {done_first}/{PARTITIONS} partitions stored; items computed "
          f"{sum(items.values())} for {N}; loads {loads}")


def test_store_names_files_by_checksum_and_renames_them_into_place(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    assert resume.store([1, 2], fs, root, "abc", "pickle") == [1, 2]
    (name,) = os.listdir(tmp_path / "parts")
    entry, _, size, ext = resume.parse_file_name(name)
    assert (entry, size, ext) == ("abc", (tmp_path / "parts" / name).stat().st_size, "pkl")
    assert os.listdir(tmp_path / "tmp") == []
    assert resume.load(fs, root, name) == [1, 2]
    assert textwrap.dedent(str(plan(db.from_sequence([1]), root))).startswith("0 of 1")
