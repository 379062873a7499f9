"""`marlwatch diff` and latency-bounded throughput, on recordings of real short runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from marlwatch.cli import main
from marlwatch.metrics import Metrics, read_iterations
from marlwatch.recording import RecordingWriter, RunInfo, open_recording
from tests.conftest import REPO, marlwatch

pytestmark = pytest.mark.timeout(180)
SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"
QUICK = ["--set", "warmup=512", "--set", "batch_size=256"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Runs in pairs started together with the same layout, long enough that their start-up
    jitter is small against the time they overlap: a3 and b3 (one config twice), then a3x and
    c6 (twice the agents). Whatever the machine does (this VM's speed drifts by tens of percent
    between runs a minute apart) weighs on both runs of a pair alike."""
    d = tmp_path_factory.mktemp("diff")
    out: dict[str, Path] = {}
    for pair in ({"a3": 3, "b3": 3}, {"a3x": 3, "c6": 6}):
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-m", "marlwatch", "run", "--headless", "--algo", "maddpg", "--agents", str(agents),
                 "--workers", "1", "--iterations", "60", *QUICK, "--record", str(d / f"{name}.arrow")],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for name, agents in pair.items()
        }
        for name, p in procs.items():
            _, err = p.communicate(timeout=150)
            assert p.returncode == 0, f"{name}: {err[-500:]}"
            out[name] = d / f"{name}.arrow"
    return out


def diff_json(capsys, a: Path, b: Path, *extra: str) -> tuple[int, dict]:
    code = main(["diff", str(a), str(b), "--json", *extra])
    out = capsys.readouterr()
    assert code in (0, 1), out.err
    return code, json.loads(out.out)


def rows(out: dict) -> dict[str, dict]:
    return {r["figure"]: r for r in out["rows"]}


def relative_change(row: dict) -> float:
    """A row's change as a percentage of A's value (shares change in percentage points)."""
    return row["change"] / row["a"] * 100 if row["change_unit"] == "pp" else row["change"]


def test_same_config_is_within_noise(runs, capsys):
    code, out = diff_json(capsys, runs["a3"], runs["b3"], "--fail-if-slower", "10")
    r = rows(out)
    assert out["notes"] == []  # same algorithm, agents, workers, settings
    # The top-level phases and the throughput of two identical runs do not differ significantly.
    for figure in ("IPS", "sample", "update", "sample share", "update share", "comm share of execution"):
        assert r[figure]["verdict"] == "within noise", r[figure]
        # Within noise: the interval holds zero, or the change is below --min-change (10% of A's value).
        assert r[figure]["lo"] <= 0 <= r[figure]["hi"] or abs(relative_change(r[figure])) < 10, r[figure]
    assert code == 0  # the regression gate stays open
    assert main(["diff", str(runs["a3"]), str(runs["b3"])]) == 0
    text = capsys.readouterr().out
    assert "change B vs A with a 95%" in text and "IPS" in text


def test_twice_the_agents_makes_update_slower_with_confidence(runs, capsys):
    code, out = diff_json(capsys, runs["a3x"], runs["c6"])
    assert "agents differ: 3 vs 6" in out["notes"]
    upd = rows(out)["update"]
    # MADDPG's update runs ~N^2 actor passes: at 6 agents it costs clearly more than at 3.
    assert upd["verdict"] == "slower", upd
    assert upd["lo"] > 0 and upd["lo"] <= upd["change"] <= upd["hi"]
    assert upd["b"] > upd["a"]
    ips = rows(out)["IPS"]
    assert ips["b"] < ips["a"]
    # The real command line, as a user's CI would call it.
    r = marlwatch("diff", str(runs["a3x"]), str(runs["c6"]))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "note: agents differ: 3 vs 6" in text
    assert any(line.split()[0] == "update" and line.rstrip().endswith("slower") for line in text.splitlines()
               if line.strip())


def test_fail_if_slower_is_a_regression_gate(runs, capsys):
    code, out = diff_json(capsys, runs["a3x"], runs["c6"], "--fail-if-slower", "5")
    ips = rows(out)["IPS"]
    assert (code == 1) == (ips["hi"] < -5)
    assert code == 1  # twice the agents costs far more than 5% IPS here
    # The other way round B is faster: never a failure.
    code, _ = diff_json(capsys, runs["c6"], runs["a3x"], "--fail-if-slower", "5")
    assert code == 0


def test_intervals_come_from_the_per_iteration_table(runs):
    rec = open_recording(runs["a3"])
    snap, table = read_iterations(rec)
    assert snap.iterations == 60 and table.iterations == 59  # every iteration after the first (start-up)
    # Per-iteration phase times add up to the phase totals of the Snapshot.
    for p in snap.phases:
        assert table.phases[p.name].sum() / 1e9 == pytest.approx(p.total_s, rel=1e-9)
    assert table.latencies_ns.sum() / 1e9 == pytest.approx(snap.steady_s, rel=1e-9)
    assert table.ips == pytest.approx(snap.ips, rel=1e-12)
    assert np.all(table.top["update"] == table.phases["update"])


@pytest.mark.parametrize("which", ["shipped", "fresh"])
def test_summary_and_diff_agree_on_every_figure_they_share(tmp_path, capsys, which):
    """One definition per figure (metrics.py): `diff A A` shows A's figures as `summary A` does."""
    path = SHIPPED
    if which == "fresh":  # a run of today's code, stopped at its iteration count
        path = tmp_path / "fresh.arrow"
        r = marlwatch("run", "--headless", "--workers", "1", "--iterations", "8", *QUICK, "--record", str(path),
                      timeout=150)
        assert r.returncode == 0, r.stderr
    assert main(["summary", str(path), "--json"]) == 0
    summ = json.loads(capsys.readouterr().out)
    _, out = diff_json(capsys, path, path)
    r = rows(out)
    assert out["iterations"] == [summ["iterations"]] * 2
    assert out["compared_iterations"] == [summ["iterations"] - 1] * 2  # all but the first (start-up)
    assert r["IPS"]["a"] == pytest.approx(summ["ips"], rel=1e-12)
    assert r["comm share of execution"]["a"] == pytest.approx(100 * summ["comm_share"], rel=1e-12)
    assert r["comm share of update"]["a"] == pytest.approx(100 * summ["comm_share_update"], rel=1e-12)
    for top in ("sample", "update", "sync"):
        assert r[f"{top} share"]["a"] == pytest.approx(100 * summ["shares"][top], rel=1e-12)
    # Phases: diff's ms per compared iteration times the iterations compared is summary's total.
    n = out["compared_iterations"][0]
    assert set(summ["phases"]) <= set(r)
    for name, ph in summ["phases"].items():
        assert r[name]["a"] * n / 1e3 == pytest.approx(ph["total_s"], rel=1e-9), name
    # And the start-up iteration is out of IPS and the latency percentiles, reported apart.
    assert 0 < summ["startup_s"] < summ["wall_s"] and summ["wall_s"] == pytest.approx(
        summ["startup_s"] + summ["steady_s"])
    assert summ["ips"] == pytest.approx((summ["iterations"] - 1) / summ["steady_s"])
    assert summ["iteration_ms"]["p99"] * 1e-3 < summ["startup_s"]  # seconds of imports are not in it


def test_diff_of_a_recording_without_iterations(tmp_path, capsys):
    empty = tmp_path / "empty.arrow"
    with RecordingWriter(empty, RunInfo("maddpg", "simple_spread", 3, 1, 0, 10)):
        pass  # a run that ended before its first iteration
    code = main(["diff", str(empty), str(SHIPPED)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"marlwatch: {empty}: no complete iteration recorded, nothing to compare"]
    assert main(["diff", str(SHIPPED), str(tmp_path / "missing.arrow")]) == 2
    assert capsys.readouterr().err.strip() == f"marlwatch: {tmp_path / 'missing.arrow'}: no such file"


def test_latency_bound_summary_on_shipped_recording(capsys):
    m = Metrics(open_recording(SHIPPED).info)
    m.add_all(open_recording(SHIPPED).batches())
    lat_ms = m.iteration_latencies_ns() / 1e6
    bound = float(np.median(lat_ms))
    assert main(["summary", str(SHIPPED), "--latency-bound", str(bound), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lb = out["latency_bound"]
    within = int((lat_ms <= bound).sum())
    assert lb["fraction_met"] == pytest.approx(within / len(lat_ms))
    assert lb["ips"] == pytest.approx(within / out["steady_s"])
    assert 0 < lb["ips"] < out["ips"]
    # A bound no iteration exceeds counts every iteration: plain IPS.
    assert main(["summary", str(SHIPPED), "--latency-bound", "1e9", "--json"]) == 0
    lb = json.loads(capsys.readouterr().out)["latency_bound"]
    assert lb["fraction_met"] == 1.0 and lb["ips"] == pytest.approx(out["ips"])
    assert main(["summary", str(SHIPPED), "--latency-bound", "100"]) == 0
    assert "latency-bounded IPS" in capsys.readouterr().out
    assert main(["summary", str(SHIPPED), "--latency-bound", "zero"]) == 2
    assert "--latency-bound takes milliseconds" in capsys.readouterr().err
