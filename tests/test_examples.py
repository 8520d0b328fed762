"""The main job and the examples, run the way a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, timeout=240):
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_main_job_on_the_embedded_default(tmp_path):
    out = run(["-m", "dask_context", "--claims", "120", "--batch", "6", "--json", "--out", "v.jsonl"], cwd=tmp_path)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["claims"] == 120 and sum(summary["verdicts"].values()) == 120
    # true counts: 20 batches, all 20 run by dask-context (not the bag's plumbing)
    assert summary["batches"] == 20 and summary["tasks"] == 20
    assert summary["workers"] == 2
    assert summary["loads"] in (1, 2)  # one per worker that served, never per task
    assert summary["warm_hits"] == 20  # workers load before they get tasks
    assert (tmp_path / ".dask-context-cache" / "model-tiny" / "config.json").exists()
    written = (tmp_path / "v.jsonl").read_text().splitlines()
    assert len(written) == 120 and summary["out"] == str(tmp_path / "v.jsonl")


def test_main_job_says_what_it_did(tmp_path):
    out = run(["-m", "dask_context", "--claims", "40", "--batch", "8", "--out", "verdicts.jsonl"], cwd=tmp_path)
    assert "40 claims verified" in out and "5 batches of up to 8 claims, 5 of them run by dask-context" in out
    assert "random weights" in out
    assert f"verdicts written to {tmp_path / 'verdicts.jsonl'}" in out


def test_fact_verification_example(tmp_path):
    out_file = tmp_path / "verdicts.jsonl"
    claims = tmp_path / "claims.txt"
    claims.write_text("the danube flows through vienna in 1900\nthe thames flows through rome in 2001\n")
    out = run([str(ROOT / "examples" / "fact_verification.py"), "--claims-file", str(claims), "--out", str(out_file)], cwd=tmp_path)
    verdicts = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [v["claim"] for v in verdicts] == claims.read_text().splitlines()
    assert all(v["verdict"] in {"SUPPORTED", "REFUTED", "NOT ENOUGH INFO"} for v in verdicts)
    assert "new model loads: 1 (1 on this cluster so far" in out and "verdicts written to" in out
