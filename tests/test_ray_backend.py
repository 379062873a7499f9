"""`marlwatch run --backend ray` on a local Ray instance (2 CPUs): the same phases as the local
backend, spans from the learner and every actor, a clean stop on a signal with nothing of Ray
left behind, and one line without Ray installed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import FAST, REPO, marlwatch
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

RUN = ["run", "--headless", "--algo", "maddpg", "--agents", "3", "--workers", "2", *FAST]


@pytest.mark.timeout(400)
def test_ray_backend_matches_local_and_stops_clean_on_sigint(tmp_path):
    before = ray_processes()
    ray_path, local_path = tmp_path / "ray.arrow", tmp_path / "local.arrow"
    proc = subprocess.Popen([sys.executable, "-m", "marlwatch", *RUN, "--backend", "ray", "--iterations", "100000",
                             "--record", str(ray_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_iterations(ray_path, 12, proc, timeout=300)
        proc.send_signal(signal.SIGINT)  # a clean stop, as q or Ctrl-C
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err
        left = left_behind(before)
        assert not left, f"Ray processes left after the run: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_left(before)

    local = marlwatch(*RUN, "--iterations", "12", "--record", str(local_path), timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
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
