"""The core pipeline end to end: real learner and worker processes, pipes, an Arrow recording."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from marlwatch.recording import open_recording
from tests.conftest import FAST, REPO, descendants_alive, marlwatch, real_run

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
def headless_recording(maddpg_run):
    return maddpg_run


def test_headless_run_records_every_process_phase_and_core(headless_recording):
    path, proc = headless_recording
    assert "IPS" in proc.stdout and "[complete]" in proc.stdout
    rec = open_recording(path)
    table = rec.read_all()
    assert rec.complete
    spans = table.filter(pc.equal(table["kind"], "span"))
    assert set(pc.unique(spans["proc"]).to_pylist()) == {0, 1, 2}
    names = set(pc.unique(spans["name"]).to_pylist())
    assert any(n.startswith("sample/") for n in names) and any(n.startswith("update/") for n in names)
    assert "update/comm/joint_inputs" in names  # the learner did real updates after the short warm-up
    cores = table.filter(pc.equal(table["kind"], "core"))
    assert set(pc.unique(cores["core"]).to_pylist()) == set(range(psutil.cpu_count()))
    info = rec.info
    assert (info.algo, info.agents, info.workers, info.env) == ("maddpg", 3, 2, "simple_spread")
    assert info.host and info.cores == psutil.cpu_count() and "torch" in info.versions


def test_summary_json_shares_add_up(headless_recording):
    path, _ = headless_recording
    proc = marlwatch("summary", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    for key in ("algo", "agents", "workers", "iterations", "wall_s", "ips", "comm_share", "comm_share_update",
                "phases", "cores"):
        assert key in s
    assert s["iterations"] == 40 and s["ips"] > 0 and s["status"] == "complete"
    assert sum(s["shares"].values()) == pytest.approx(1.0)
    top = {k: v for k, v in s["phases"].items() if "/" not in k}
    # Top-level phases that have a span of their own account for their share of process time.
    for name in ("sample", "update"):
        assert top[name]["share"] == pytest.approx(s["shares"][name])
    assert 0 < s["comm_share"] < 1 and 0 < s["comm_share_update"] < 1
    for row in s["phases"].values():
        assert set(row) >= {"total_s", "share", "count", "p50_ms", "p95_ms", "p99_ms"}
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert len(s["cores"]) == psutil.cpu_count()


def test_recording_reads_with_pyarrow_alone_and_polars(headless_recording):
    path, _ = headless_recording
    with open(path, "rb") as f:
        table = pa.ipc.open_stream(f).read_all()
    assert b"marlwatch.run" in table.schema.metadata
    assert table["kind"][-1].as_py() == "end"
    pl = pytest.importorskip("polars")
    df = pl.read_ipc_stream(path)
    assert df.filter(pl.col("kind") == "span").height == pc.sum(pc.equal(table["kind"], "span")).as_py()


def _iterations_on_disk(path) -> int:
    from marlwatch.metrics import Metrics
    from marlwatch.recording import RecordingError

    try:
        rec = open_recording(path)
        return Metrics(rec.info).add_all(rec.batches()).snapshot().iterations
    except (RecordingError, OSError):
        return 0


def test_sigkill_of_the_monitor_leaves_a_readable_file_and_no_process(tmp_path):
    path = tmp_path / "killed.arrow"
    proc = subprocess.Popen([sys.executable, "-m", "marlwatch", "run", "--headless", "--workers", "2",
                             "--iterations", "100000", "--record", str(path), *FAST], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    # Wait until a few iterations have been flushed to disk, then kill without warning.
    while time.monotonic() < deadline and _iterations_on_disk(path) < 3:
        time.sleep(0.5)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the run started no processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"children survived the monitor: {alive}"
    out = marlwatch("summary", str(path), "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["status"].startswith("truncated") and "truncated" in out.stderr
    assert 0 < s["iterations"] < 100000


def test_worker_crash_stops_the_run_naming_the_worker(tmp_path, no_leftovers):
    from marlwatch.metrics import summarize
    from marlwatch.runner import Run, RunConfig
    from tests.crashing_algo import SPEC

    path = tmp_path / "crash.arrow"
    run = Run(RunConfig(algo="crashing", workers=2, iterations=1000, record=str(path),
                        settings={"warmup": "256", "batch_size": "64", "crash_at": "3"}), algorithm=SPEC)
    run.start()
    deadline = time.monotonic() + 60
    while run.alive and time.monotonic() < deadline:
        run.pump(0.2)
    run.finish()
    assert run.failure is not None
    assert "worker 1 crashed" in run.failure and "RuntimeError: injected failure in collect" in run.failure
    rec = open_recording(path)
    snap = summarize(rec)
    assert rec.complete
    assert snap.iterations == 2  # everything before the crash is kept
    crashed = [p for p in snap.procs if p.state == "crashed"]
    assert [p.role for p in crashed] == ["worker 1"] and "injected failure" in crashed[0].error
    assert not descendants_alive()


@pytest.mark.parametrize("algo", ["maddpg", "independent"])
def test_maddpg_communicates_and_the_independent_baseline_does_not(tmp_path, algo, maddpg_run):
    from marlwatch.metrics import summarize

    snap = summarize(open_recording(maddpg_run[0])) if algo == "maddpg" else real_run(tmp_path, algo, 3, 8,
                                                                                        *FAST[1::2])
    comm = [p.name for p in snap.phases if p.comm]
    assert "update/critic" in {p.name for p in snap.phases}  # past the warm-up: it really updated
    if algo == "maddpg":
        assert comm == ["update/comm/joint_inputs"] and snap.comm_share_update > 0
    else:
        assert comm == [] and snap.comm_share == 0.0


def _started_spans_impl(path) -> dict[int, str]:
    table = open_recording(path).read_all()
    started = table.filter(pc.and_(pc.equal(table["kind"], "event"), pc.equal(table["name"], "started")))
    return {p: json.loads(t)["spans_impl"] for p, t in zip(started["proc"].to_pylist(), started["text"].to_pylist(),
                                                            strict=True)}


def test_every_process_says_which_spans_it_ran(headless_recording):
    path, _ = headless_recording
    from marlwatch import instrument

    assert _started_spans_impl(path) == {0: instrument.DEFAULT_IMPLEMENTATION, 1: instrument.DEFAULT_IMPLEMENTATION,
                                         2: instrument.DEFAULT_IMPLEMENTATION}


def test_a_run_on_the_python_spans_records_the_same_phases(tmp_path, headless_recording):
    # What a machine without the C spans runs, end to end: MARLWATCH_SPANS=python.
    path = tmp_path / "py.arrow"
    proc = marlwatch("run", "--headless", "--algo", "maddpg", "--agents", "3", "--workers", "2",
                     "--iterations", "40", "--record", str(path), *FAST, env={**os.environ, "MARLWATCH_SPANS": "python"})
    assert proc.returncode == 0, proc.stderr
    assert set(_started_spans_impl(path).values()) == {"python"}

    def phases(p) -> set[tuple[int, str]]:
        t = open_recording(p).read_all()
        s = t.filter(pc.equal(t["kind"], "span"))
        return set(zip(s["proc"].to_pylist(), s["name"].to_pylist(), strict=True))

    assert phases(path) == phases(headless_recording[0])
