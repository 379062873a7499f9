"""`marlwatch sweep`: a tiny real grid, its recordings and its tables."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from marlwatch.recording import open_recording
from marlwatch.sweep import COLUMNS, _growth, fitted_growth
from tests.conftest import REPO, marlwatch


def test_growth_per_doubling() -> None:
    assert _growth(10.0, 40.0, 2, 4) == pytest.approx(4.0)
    assert _growth(10.0, 40.0, 2, 8) == pytest.approx(2.0)  # two doublings: 2x each
    assert fitted_growth([2, 4, 8], [1.0, 8.0, 64.0]) == pytest.approx(8.0)
    assert fitted_growth([2], [1.0]) is None


@pytest.mark.timeout(150)
def test_tiny_real_sweep(tmp_path, no_leftovers) -> None:
    out = tmp_path / "sweep"
    proc = marlwatch("sweep", "--algo", "neurcomm", "--agents", "2,4", "--workers", "1", "--iterations", "3",
                     "--out", str(out), "--set", "max_cycles=10", "--latency-bound", "600000", "--report",
                     timeout=140)
    assert proc.returncode == 0, proc.stderr
    assert "| agents | workers |" in proc.stdout and "comm / exec" in proc.stdout
    # Under a bound no iteration reaches, the one worker count is the choice at each agent count.
    assert "- neurcomm, 2 agents, p99 within 600000 ms: workers 1, " in proc.stdout
    assert "neurcomm, 4 agents, p99 within 600000 ms: workers 1, " in proc.stdout
    assert "update (dots: comm) ms/it vs agents" in proc.stdout  # the terminal plots
    assert (out / "report.html").read_text().count("<svg") == 4
    assert "neurcomm, 2 agents, 1 worker, 3 iterations ->" in proc.stderr  # "1 workers" read wrong
    recs = sorted(out.glob("*.arrow"))
    assert [r.name for r in recs] == ["neurcomm-a2-w1.arrow", "neurcomm-a4-w1.arrow"]
    for r in recs:
        rec = open_recording(r)
        for _ in rec.batches():
            pass
        assert rec.complete and rec.info.algo == "neurcomm"
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    assert [(r["agents"], r["workers"], r["iterations"]) for r in rows] == [("2", "1", "3"), ("4", "1", "3")]
    assert rows[0]["update_growth_per_doubling"] == "" and float(rows[1]["update_growth_per_doubling"]) > 0
    for r in rows:
        assert 0 < float(r["comm_share_exec"]) < 1 and float(r["ips"]) > 0
        shares = float(r["sample_share"]) + float(r["update_share"]) + float(r["sync_share"])
        assert 0.9 < shares <= 1.0 + 1e-9
    data = json.loads((out / "sweep.json").read_text())
    assert data["algo"] == "neurcomm" and len(data["rows"]) == 2 and "1" in data["fitted_growth_per_doubling"]
    assert [c["best"] for c in data["latency_bound"]] == [{"workers": 1}, {"workers": 1}]
    for rec in recs:  # each cell's recording carries the bound: summary shows it without the flag
        assert "latency-bounded IPS" in marlwatch("summary", str(rec)).stdout
    assert (out / "sweep.md").read_text().startswith("| agents |")
    summary = marlwatch("summary", str(recs[1]))  # every cell is an ordinary recording
    assert summary.returncode == 0 and "neurcomm" in summary.stdout


@pytest.mark.parametrize("argv, message", [
    (["--algo", "neurcomm", "--agents", "2,x"], "must be a whole number"),
    (["--algo", "neurcomm", "--workers", "0"], "at least 1"),
    (["--algo", "neurcomm", "--iterations", "-3"], "at least 1"),
    (["--algo", "nope"], "unknown algorithm"),
    (["--algo", "neurcomm", "--set", "nosuch=1"], "unknown setting"),
    (["--agents", "2"], "required"),
])
def test_bad_flags_are_usage_errors(argv, message, tmp_path) -> None:
    proc = marlwatch("sweep", *argv, "--out", str(tmp_path / "o"), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("marlwatch: ") and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing ran


def test_out_must_be_a_folder(tmp_path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    proc = marlwatch("sweep", "--algo", "neurcomm", "--out", str(f), timeout=60)
    assert proc.returncode == 2 and "not a folder" in proc.stderr


@pytest.mark.timeout(120)
def test_sigterm_stops_the_sweep_with_the_cell_recorded(tmp_path, no_leftovers) -> None:
    """A job scheduler's stop (SIGTERM) in the middle of a cell: that cell's recording is complete,
    no later cell starts, nothing is left running, exit 128 + 15."""
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "marlwatch", "sweep", "--algo", "neurcomm", "--agents", "2,3",
                             "--workers", "1", "--iterations", "100000", "--set", "max_cycles=10", "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "neurcomm-a2-w1.arrow"
    deadline = time.monotonic() + 90
    while not (first.exists() and first.stat().st_size > 20_000):  # the cell runs and records
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "sweep stopped by SIGTERM; 0 complete cells kept" in err and "cell 2/2" not in err
    rec = open_recording(first)
    assert rec.read_all().num_rows > 0 and rec.complete
    assert not (out / "neurcomm-a3-w1.arrow").exists()
