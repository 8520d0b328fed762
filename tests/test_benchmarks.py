"""The benchmark's quick mode runs end to end and reports sane numbers.

It runs ``python benchmarks/run.py --quick`` as a user would (a subprocess, with a
tiny model, every scenario that does not need Ray), then reads what it wrote.
"""

from __future__ import annotations

import doctest
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dask_context import config

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
THREADS = 1  # per worker process
DASK_ARMS = {"load-per-task", "dask-context", "global-cache"}
WARNED = ("dask-context warned", "dask-context warned+peers")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
        "--out", str(out / "results"), "--cache", str(out / "models"),
        "--workers", str(WORKERS), "--repeat", "2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out / "results", json.loads((out / "results" / "results.json").read_text())


def rows_of(results: dict[str, Any], scenario: str) -> dict[tuple[int, str], dict[str, Any]]:
    """Each arm's first measurement in ``scenario``."""
    return {(r["batch"], r["arm"]): r for r in results["rows"]
            if r["scenario"] == scenario and r["repeat"] == 0}


def test_compared_arms_are_repeated_and_compared(quick):
    out, results = quick
    repeated = {(r["scenario"], r["arm"]) for r in results["rows"] if r["repeat"] == 1}
    # one-model runs repeat the compared arms; the three-model run repeats nothing
    assert repeated == {("single", "dask-context"), ("single", "global-cache"),
                        ("preempt", "dask-context"), ("preempt", "global-cache"),
                        *(("preempt", arm) for arm in WARNED)}
    for r in results["rows"]:
        assert r["repeat"] in (0, 1) and r["status"] == "ok", r
    md = (out / "results.md").read_text()
    table = md[md.index("## Repeated arms"):md.index("## Targets")]
    for run in ("single B=", "preempt B="):
        line = next(x for x in table.splitlines() if x.startswith(f"| {run}") and "global-cache" in x)
        assert line.count(",") == 2 and line.rstrip().endswith(("**yes** |", "**within noise** |", "**no** |"))
    assert "| dask-context warned+peers |" in table


def test_outputs_exist(quick):
    out, results = quick
    md = (out / "results.md").read_text()
    assert "| scenario | B |" in md and "dask-context" in md
    assert "| arm | all warm (s) |" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["meta"]["quick"] is True
    assert results["calibration"]["load_seconds"] > 0


def test_every_scenario_and_arm_ran(quick):
    _, results = quick
    for scenario in ("single", "preempt", "multi"):
        rows = rows_of(results, scenario)
        arms = DASK_ARMS | set(WARNED) if scenario == "preempt" else DASK_ARMS
        assert {arm for _, arm in rows} == arms, scenario
        for row in rows.values():
            assert row["status"] == "ok", row
            assert row["wall"] > 0 and row["limit"] > 0 and row["x_limit"] > 0
            # every claim's verdict came back exactly once (the runner checks each batch)
            assert row["results"] == row["items"], row
    assert not any(r["arm"] == "ray-data" for r in results["rows"])


def test_loads_are_counted_sanely(quick):
    _, results = quick
    for row in results["rows"]:
        models, kills = row["models"], row["kills"] + row["warnings"]
        if row["arm"] == "load-per-task":
            # every task loads; a killed worker's tasks load again
            assert row["loads"] >= row["tasks"]
            assert row["reduction"] == pytest.approx(0.0)
            if not kills:
                assert row["loads"] == row["tasks"]
        elif row["arm"] in ("dask-context", *WARNED):
            assert models <= row["loads"] <= WORKERS * models + kills, row
            router = next(iter(row["extra"]["router"].values()))
            assert router["tasks"] >= row["tasks"] // models
        assert row["loads"] >= 1


def test_scenarios_do_what_they_say(quick):
    _, results = quick
    for (_, arm), row in rows_of(results, "preempt").items():
        if arm in WARNED:
            assert row["warnings"] >= 1, row
        else:
            assert row["kills"] >= 1 and row["warnings"] == 0, row
    for row in results["rows"]:
        if row["scenario"] != "preempt":
            assert row["kills"] == row["warnings"] == row["reruns"] == 0, row
    multi = rows_of(results, "multi")
    assert all(r["models"] == 3 for r in multi.values())
    for row in multi.values():
        # every model of the pipeline was loaded somewhere
        assert len(row["loads_per_model"]) == 3, row


def test_coldstart_reads_the_shared_storage_once_with_peers(quick):
    _, results = quick
    rows = {r["arm"]: r for r in results["coldstart"]}
    assert set(rows) == {"filesystem", "peer bootstrap"}
    size, n = rows["filesystem"]["checkpoint_bytes"], rows["filesystem"]["workers"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["all_warm"] > 0 and row["bound"] > 0
    # without peers every worker reads the checkpoint from the shared storage
    assert rows["filesystem"]["shared_bytes"] == n * size
    peer = rows["peer bootstrap"]
    assert peer["shared_bytes"] == size and peer["peer_bytes"] == (n - 1) * size
    assert peer["origins"] == ["files"] + ["peer"] * (n - 1)


@pytest.mark.parametrize("arm", WARNED)
def test_warned_workers_drain(quick, arm):
    out, results = quick
    row = next(r for r in results["rows"] if r["arm"] == arm)
    # every warned worker drained and left within its grace: none was killed
    assert row["kills"] == 0 and len(row["left_in_grace"]) == row["warnings"], row
    drained = row["extra"]["drained"]
    assert len(drained) == row["warnings"] and all(d["retired"] for d in drained), drained
    # only the tasks a warned worker was running, or had been handed, can run again
    prefetch = int(config.get("scheduler.prefetch"))
    assert row["reruns"] <= row["warnings"] * (THREADS + prefetch), row
    assert row["reruns"] <= sum(d["abandoned"] for d in drained), row
    assert "## Preemption" in (out / "results.md").read_text()
    assert f"| {arm} | {row['warnings']} warned:" in (out / "results.md").read_text()


def test_warned_peers_read_the_storage_only_for_copies_from_it(quick):
    _, results = quick
    row = next(r for r in results["rows"] if r["arm"] == "dask-context warned+peers")
    # every load used a staged copy; only copies made from the checkpoint read the storage,
    # and each new worker is a node of its own (no node-local copy to find)
    staged = row["extra"]["staged"]
    assert row["loads"] <= len(staged), staged
    assert {c["origin"] for c in staged} <= {"files", "peer"} and staged[0]["origin"] == "files"
    assert row["extra"]["source_bytes"] == sum(c["nbytes"] for c in staged if c["origin"] == "files")


@pytest.mark.parametrize(
    "module", ["loading", "calibrate", "plan", "timeline", "coldstart", "tasks", "report", "router_scale"]
)
def test_doctests(module):
    mod = importlib.import_module(f"benchmarks.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_receive_measures_the_stagings_own_receiver(tmp_path):
    from benchmarks.coldstart import measure_receive

    size = 3 << 20
    out = measure_receive(size, tmp=tmp_path, repeats=1)
    received = tmp_path / "receive" / "fresh-0" / "model.bin"
    assert received.read_bytes() == (tmp_path / "receive" / "model.bin").read_bytes()
    assert not (tmp_path / "receive" / "recycled-0").exists()
    for mode in ("recycled", "fresh"):
        # CPU times tick every 10 ms: a copy of 3 MiB may take less
        assert out[mode]["wall"] > 0 and out[mode]["cpu_per_gb"] >= 0, out
