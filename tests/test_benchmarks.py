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

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
DASK_ARMS = {"load-per-task", "dask-context", "global-cache"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
        "--out", str(out / "results"), "--cache", str(out / "models"),
        "--workers", str(WORKERS),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out / "results", json.loads((out / "results" / "results.json").read_text())


def rows_of(results: dict[str, Any], scenario: str) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["batch"], r["arm"]): r for r in results["rows"] if r["scenario"] == scenario}


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
        assert {arm for _, arm in rows} == DASK_ARMS, scenario
        for row in rows.values():
            assert row["status"] == "ok", row
            assert row["wall"] > 0 and row["limit"] > 0 and row["x_limit"] > 0
    assert not any(r["arm"] == "ray-data" for r in results["rows"])


def test_loads_are_counted_sanely(quick):
    _, results = quick
    for row in results["rows"]:
        models, kills = row["models"], row["kills"]
        if row["arm"] == "load-per-task":
            # every task loads; a killed worker's tasks load again
            assert row["loads"] >= row["tasks"]
            assert row["reduction"] == pytest.approx(0.0)
            if not kills:
                assert row["loads"] == row["tasks"]
        elif row["arm"] == "dask-context":
            assert models <= row["loads"] <= WORKERS * models + kills, row
            router = next(iter(row["extra"]["router"].values()))
            assert router["tasks"] >= row["tasks"] // models
        assert row["loads"] >= 1


def test_scenarios_do_what_they_say(quick):
    _, results = quick
    assert all(r["kills"] >= 1 for r in rows_of(results, "preempt").values())
    assert all(r["kills"] == 0 for r in results["rows"] if r["scenario"] != "preempt")
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


@pytest.mark.parametrize("module", ["loading", "calibrate", "plan", "timeline", "coldstart"])
def test_doctests(module):
    mod = importlib.import_module(f"benchmarks.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
