"""`marlwatch run --backend ray` on a local Ray instance (2 CPUs): the same phases as the local
backend, spans from the learner and every actor, a clean stop on SIGTERM and on Ctrl-C in the app
with nothing of Ray left behind, `--keep-going` past a killed actor, and one line without Ray
installed. Two Ray runs for the module (Ray is slow to start): one headless, shared by the tests
that read it, and one in the app."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys

import pyarrow.compute as pc
import pytest

from tests.conftest import FAST, REPO, marlwatch, wait_for
from tests.ray_helpers import (
    events,
    kill_left,
    left_behind,
    ray_processes,
    span_slots,
    table,
    wait_iterations,
)

pytest.importorskip("ray")
# One xdist worker runs every Ray test: each checks that no Ray process is left on the machine.
pytestmark = pytest.mark.xdist_group("ray")

RUN = ["run", "--headless", "--algo", "maddpg", "--agents", "3", "--workers", "2", *FAST]


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """One headless run on a local Ray instance that marlwatch starts, stopped by SIGTERM after 12
    iterations: (recording, exit code, stderr, Ray processes left behind)."""
    before = ray_processes()
    path = tmp_path_factory.mktemp("ray") / "ray.arrow"
    proc = subprocess.Popen([sys.executable, "-m", "marlwatch", *RUN, "--backend", "ray", "--iterations", "100000",
                             "--record", str(path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_iterations(path, 12, proc, timeout=300)
        os.killpg(proc.pid, signal.SIGTERM)  # `kill -TERM -PGID`: the monitor's group, not Ray's
        out, err = proc.communicate(timeout=90)
        yield path, proc.returncode, err, left_behind(before)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_left(before)


@pytest.mark.timeout(400)
def test_ray_backend_stops_clean_on_sigterm_with_nothing_left(sigterm_run):
    _path, code, err, left = sigterm_run
    assert code == 143, err[-2000:]
    assert "Traceback" not in err
    assert not left, f"Ray processes left after the run: {left}"


@pytest.mark.timeout(400)
def test_ray_backend_matches_local(sigterm_run, maddpg_run):
    # The local backend's run with the same settings is the session's shared one (conftest).
    ray_path, local_path = sigterm_run[0], maddpg_run[0]
    summaries = {}
    for name, path in (("ray", ray_path), ("local", local_path)):
        r = marlwatch("summary", "--json", str(path))
        assert r.returncode == 0, r.stderr
        summaries[name] = json.loads(r.stdout)
    ray_sum = summaries["ray"]
    assert ray_sum["complete"] and ray_sum["ips"] > 0 and ray_sum["iterations"] >= 12
    assert set(ray_sum["phases"]) == set(summaries["local"]["phases"])
    t = table(ray_path)
    assert span_slots(t) == {0, 1, 2}  # the learner and both actors
    roles = {e["proc"]: e["role"] for e in events(t, "started")}
    assert roles == {0: "learner", 1: "worker 1", 2: "worker 2"}
    # Actors on the monitor's machine: the clock is the same, and its estimate measures the method's error.
    clocks = events(t, "clock")
    assert {c["proc"] for c in clocks} == {1, 2}
    for c in clocks:
        assert c["same_clock"] and c["applied_ns"] == 0
        assert abs(c["offset_ns"]) <= c["rtt_ns"] / 2 + 1
    assert ray_sum["procs"][1]["clock_rtt_ms"] is not None
    info = t.schema.metadata[b"marlwatch.run"]
    assert json.loads(info)["extra"]["backend"] == "ray"


@pytest.mark.timeout(400)
def test_keep_going_past_a_killed_actor_in_the_app_then_ctrl_c_leaves_nothing(tmp_path):
    """The live app on `--backend ray --keep-going`: an actor killed mid-run is shown crashed with
    its Ray actor and node, the run goes on with the other, and Ctrl-C (the key: q's action)
    ends it leaving no actor, raylet or Ray instance behind; the recording keeps everything."""
    from marlwatch.app.live import LiveApp
    from marlwatch.app.widgets import WorkerRow
    from marlwatch.cli.parser import build_parser
    from marlwatch.cli.run import make_run, start_run

    before = ray_processes()
    path = tmp_path / "kept.arrow"
    args = build_parser().parse_args([*RUN[:1], *RUN[2:], "--backend", "ray", "--keep-going",
                                      "--record", str(path)])
    run = make_run(args, default_iterations=None)
    app = LiveApp(run)
    seen: dict[str, object] = {}

    def iterations() -> int:
        return app.snapshot.iterations if app.snapshot is not None else 0

    def lost_row() -> WorkerRow | None:
        return next((w for w in app.query(WorkerRow) if w.has_class("-crashed")), None)

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: iterations() >= 5 and run.monitor.procs[2].pid is not None, 300,
                           "5 iterations")
            os.kill(run.monitor.procs[2].pid, signal.SIGKILL)  # worker 2's actor
            await wait_for(pilot, lambda: lost_row() is not None, 120, "the lost actor's row")
            seen["killed_at"] = iterations()
            await wait_for(pilot, lambda: iterations() >= seen["killed_at"] + 5, 120, "the run to go on")
            seen["row"] = lost_row().plain
            await pilot.press("ctrl+c")
            await wait_for(pilot, lambda: app.ended is not None, 120, "the run to stop")
            seen["left"] = left_behind(before)

    try:
        start_run(run)
        asyncio.run(scenario())
    finally:
        if run.started:
            run.abort("test ended")
        kill_left(before)
    assert not seen["left"], f"Ray processes left after the run: {seen['left']}"
    assert re.search(r"worker 2 .*crashed", seen["row"]) and \
        re.search(r"Ray actor [0-9a-f]{8} on node-a \(.+\) died", seen["row"]), seen["row"]
    assert run.failure and run.failure.startswith("worker 2 crashed: Ray actor")  # reported, not stopping
    r = marlwatch("summary", "--json", str(path))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    procs = {p["role"]: p for p in summary["procs"]}
    assert summary["complete"] and summary["iterations"] >= seen["killed_at"] + 5
    assert procs["worker 2"]["state"] == "crashed" and "on node-a" in procs["worker 2"]["error"]
    assert procs["worker 1"]["state"] == "finished"  # the other actor was there to the end
    # Worker 2's spans up to its death are kept; worker 1's go on after it.
    t = table(path)
    spans = t.filter(pc.equal(t["kind"], "span"))
    last = {slot: pc.max(spans.filter(pc.equal(spans["proc"], slot))["t_ns"]).as_py() for slot in (1, 2)}
    crashed_at = next(e["t_ns"] for e in events(t, "crashed") if e["proc"] == 2)
    assert last[2] <= crashed_at < last[1]


def test_without_ray_installed_one_line_and_exit_2(tmp_path):
    # sys.modules["ray"] = None: what Python does for a package that is not installed.
    code = ("import sys; sys.modules['ray'] = None; from marlwatch.cli import main; "
            f"sys.exit(main({[*RUN, '--backend', 'ray', '--record', str(tmp_path / 'r.arrow')]!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marlwatch: "), r.stderr
    assert "pip install 'marlwatch[ray]'" in lines[0]
    assert not (tmp_path / "r.arrow").exists()


def test_ray_address_without_ray_backend_is_a_usage_error():
    r = marlwatch(*RUN, "--ray-address", "auto")
    assert r.returncode == 2 and r.stderr.strip() == "marlwatch: --ray-address goes with --backend ray"


REAPED_GROUP = r"""
import os, subprocess, sys, time
from marlwatch.launchers.ray import start_reaper
# A group like a local Ray instance's: a leader and a child that ignores SIGTERM.
leader = subprocess.Popen([sys.executable, "-c", "import signal, subprocess, sys, time; "
                           "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                           "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                           "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); time.sleep(600)"],
                          start_new_session=True)
start_reaper(leader.pid)
print(leader.pid, flush=True)
time.sleep(600)
"""


def test_the_reaper_ends_the_group_when_the_monitor_is_killed():
    """What leaves no Ray process behind when the monitor itself is killed (SIGKILL: nothing of it runs)."""
    import os
    import time

    from tests.conftest import group_members

    monitor = subprocess.Popen([sys.executable, "-c", REAPED_GROUP], cwd=REPO, stdout=subprocess.PIPE, text=True)
    pgid = None
    try:
        pgid = int(monitor.stdout.readline())
        deadline = time.monotonic() + 30
        while len(group_members(pgid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(group_members(pgid)) == 2
        monitor.kill()
        monitor.wait()
        deadline = time.monotonic() + 30
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_members(pgid), "the group outlived the monitor"
    finally:
        monitor.kill()
        for p in group_members(pgid) if pgid is not None else []:
            os.kill(p.pid, signal.SIGKILL)
