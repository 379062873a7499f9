"""`marlwatch diff` and latency-bounded throughput: the statistics on written recordings with known
noise and differences, the figures on a real short run and the shipped recording."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from marlwatch.cli import main
from marlwatch.metrics import Metrics, read_iterations
from marlwatch.recording import SCHEMA, RecordingWriter, RunInfo, open_recording
from tests.conftest import REPO, marlwatch

pytestmark = pytest.mark.timeout(120)
SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"


MS = 1_000_000


def synthetic_run(path: Path, *, agents: int = 3, seed: int = 0, iterations: int = 60, update_ms: float = 20.0,
                  comm_share: float = 0.3) -> Path:
    """A MADDPG-shaped recording written by the real writer, with the noise real runs have:
    per-iteration log-normal jitter on a slow drift (neighbouring iterations are alike, as on a
    machine whose speed wanders). The learner gathers while its worker samples, then updates
    (`update/comm/joint_inputs` is `comm_share` of it); iteration 0 is a long start-up."""
    rng = np.random.default_rng(seed)
    info = RunInfo("maddpg", "simple_spread", agents, 1, 0, iterations, procs={"0": "learner", "1": "worker 1"},
                   extra={"config": {"agents": agents, "workers": 1, "batch_size": 256}})
    rows: list[dict] = []
    t, drift = 0, 0.0
    for i in range(iterations):
        drift = 0.8 * drift + rng.normal(0, 0.03)
        speed = float(np.exp(drift))
        sample = int(30 * MS * speed * rng.lognormal(0, 0.08)) + (2000 * MS if i == 0 else 0)
        update = int(update_ms * MS * speed * rng.lognormal(0, 0.08))
        comm = int(update * comm_share)
        rows += [
            {"kind": "span", "proc": 1, "name": "sample", "t_ns": t, "dur_ns": sample, "iter": i},
            {"kind": "span", "proc": 1, "name": "sample/env_step", "parent": "sample", "t_ns": t,
             "dur_ns": sample // 2, "iter": i},
            {"kind": "span", "proc": 0, "name": "sync/gather", "t_ns": t, "dur_ns": sample, "iter": i},
            {"kind": "span", "proc": 0, "name": "update", "t_ns": t + sample, "dur_ns": update, "iter": i},
            {"kind": "span", "proc": 0, "name": "update/comm/joint_inputs", "parent": "update",
             "t_ns": t + sample, "dur_ns": comm, "iter": i},
            {"kind": "span", "proc": 1, "name": "sync/wait", "t_ns": t + sample, "dur_ns": update, "iter": i},
        ]
        t += sample + update
        rows += [{"kind": "iter", "proc": slot, "t_ns": t, "iter": i + 1} for slot in (0, 1)]
    with RecordingWriter(path, info, flush_interval_s=1e9) as w:
        w.append(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One config twice (a3, b3: other seeds of the same noise), and twice the agents (c6: an
    update ~1.8x as long, with four times the communication). Deterministic: the statistics are
    tested, not this machine's load."""
    d = tmp_path_factory.mktemp("diff")
    return {"a3": synthetic_run(d / "a3.arrow", seed=1), "b3": synthetic_run(d / "b3.arrow", seed=2),
            "a3x": synthetic_run(d / "a3x.arrow", seed=3),
            "c6": synthetic_run(d / "c6.arrow", agents=6, seed=4, update_ms=36.0, comm_share=0.6)}


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
def test_summary_and_diff_agree_on_every_figure_they_share(capsys, which, request):
    """One definition per figure (metrics.py): `diff A A` shows A's figures as `summary A` does."""
    # "fresh": a run of today's code, stopped at its iteration count
    path = SHIPPED if which == "shipped" else request.getfixturevalue("maddpg_run")[0]
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
    # B was still being read on its thread when A failed: the command waits for it, so that
    # nothing reads a file once it has returned (the caller may rewrite it: when the reader
    # memory-mapped the file, that was a SIGBUS, which once took a test worker down with it).
    assert not [t for t in threading.enumerate() if t.name == "diff-read-b"]
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"marlwatch: {empty}: no complete iteration recorded, nothing to compare"]
    assert main(["diff", str(SHIPPED), str(tmp_path / "missing.arrow")]) == 2
    assert capsys.readouterr().err.strip() == f"marlwatch: {tmp_path / 'missing.arrow'}: no such file"
    # B is read on a second thread: its error is still the one line, and with both bad, A's.
    assert main(["diff", str(SHIPPED), str(empty)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"marlwatch: {empty}: no complete iteration recorded, nothing to compare"]
    other = tmp_path / "other.arrow"
    other.write_bytes(empty.read_bytes())
    assert main(["diff", str(other), str(empty)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"marlwatch: {other}: no complete iteration recorded, nothing to compare"]


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
