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
    out = run(["-m", "dask_context", "--claims", "120", "--batch", "6", "--json"], cwd=tmp_path)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["claims"] == 120 and sum(summary["verdicts"].values()) == 120
    assert summary["workers"] == 2
    assert summary["loads"] in (1, 2)  # one per worker that served, never per task
    assert (tmp_path / ".dask-context-cache" / "model-tiny" / "config.json").exists()


def test_fact_verification_example(tmp_path):
    out_file = tmp_path / "verdicts.jsonl"
    claims = tmp_path / "claims.txt"
    claims.write_text("the danube flows through vienna in 1900\nthe thames flows through rome in 2001\n")
    out = run([str(ROOT / "examples" / "fact_verification.py"), "--claims", str(claims), "--out", str(out_file)], cwd=tmp_path)
    verdicts = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [v["claim"] for v in verdicts] == claims.read_text().splitlines()
    assert all(v["verdict"] in {"SUPPORTED", "REFUTED", "NOT ENOUGH INFO"} for v in verdicts)
    assert "model loads: 1 for" in out
