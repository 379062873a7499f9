"""`marlwatch run --backend ray --ray-address` on a simulated two-node cluster (one machine, two
raylets: tests/ray_cluster.py): spans from actors on both nodes, both nodes in the recording and
in the Cores panel, a clock estimate per connection, and a lost node stopping the run with a
message naming the actor and its node. One cluster and one run for the module (Ray is slow to start)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pyarrow.compute as pc
import pytest

from marlwatch.recording import open_recording
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

# One xdist worker runs every Ray test: each checks that no Ray process is left on the machine.
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray (the test extra)"), pytest.mark.xdist_group("ray")]


@pytest.fixture(scope="module")
def lost_node_run(tmp_path_factory):
    """A run on the cluster whose second node is removed after a few iterations."""
    before = ray_processes()
    path = tmp_path_factory.mktemp("cluster") / "cluster.arrow"
    # The cluster's files in a folder of the test's own (short: Ray's socket paths must fit in 107
    # bytes), not the shared /tmp/ray; every node on the loopback address.
    ray_tmp = tempfile.mkdtemp(prefix="mwc-")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": ray_tmp}
    cluster = subprocess.Popen([sys.executable, str(REPO / "tests" / "ray_cluster.py")], cwd=REPO, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    run = None
    try:
        address = json.loads(cluster.stdout.readline())["address"]
        run = subprocess.Popen([sys.executable, "-m", "marlwatch", "run", "--headless", "--backend", "ray",
                                "--ray-address", address, "--algo", "maddpg", "--agents", "3", "--workers", "2",
                                *FAST, "--iterations", "100000", "--record", str(path)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_iterations(path, 10, run, timeout=300)
        cluster.stdin.write("remove\n")
        cluster.stdin.flush()
        assert cluster.stdout.readline().strip() == "removed"
        out, err = run.communicate(timeout=120)
        yield path, run.returncode, err
    finally:
        for p in (run, cluster):
            if p is not None and p.poll() is None:
                if p is cluster:
                    cluster.stdin.close()
                    try:
                        cluster.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        cluster.kill()
                else:
                    p.kill()
        kill_left(before)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(500)
def test_lost_node_stops_the_run_naming_actor_and_node(lost_node_run):
    path, code, err = lost_node_run
    assert code == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    # The learner reports which of its actors is lost, and where: that worker crashed, its own
    # connection only said it left.
    assert re.match(r"marlwatch: run failed: worker [12] crashed: Ray actor [0-9a-f]{8} on node-b \(", last), \
        err[-3000:]
    assert "Traceback" not in err
    r = marlwatch("summary", "--json", str(path))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["complete"]  # everything before the loss is kept
    lost = [p for p in summary["procs"] if p["state"] == "crashed"]
    assert len(lost) == 1 and lost[0]["node"] == "node-b" and "Ray actor" in lost[0]["error"]
    assert "on node-b" in lost[0]["error"]


@pytest.mark.timeout(500)
def test_spans_nodes_and_clocks_from_both_nodes(lost_node_run):
    path = lost_node_run[0]
    t = table(path)
    assert span_slots(t) >= {0, 1, 2}
    nodes = {n["node"]: n for n in events(t, "node")}
    assert set(nodes) == {"node-a", "node-b"}
    assert nodes["node-a"]["local"] and not nodes["node-b"]["local"]
    assert nodes["node-b"]["first_core"] == nodes["node-a"]["cores"]  # node-b's cores after node-a's
    started = {e["proc"]: e for e in events(t, "started")}
    assert {started[1]["node"], started[2]["node"]} == {"node-a", "node-b"}  # one actor per node
    sampler = next(s for s, e in started.items() if e["role"] == "sampler")
    assert started[sampler]["node"] == "node-b"  # the monitor samples node-a itself
    # node-b's sampler reported its cores (numbered after node-a's) and its actor's CPU and memory
    cores = t.filter(pc.equal(t["kind"], "core"))
    assert max(cores["core"].to_pylist()) >= nodes["node-b"]["first_core"]
    on_b = next(s for s in (1, 2) if started[s]["node"] == "node-b")
    sampled_from = max(e["t_ns"] for e in events(t, "node") if e["node"] == "node-b")  # cores placed
    procs = t.filter(pc.and_(pc.equal(t["kind"], "proc"), pc.equal(t["proc"], on_b)))
    assert pc.sum(pc.greater(procs["t_ns"], sampled_from)).as_py() > 0  # from node-b's sampler
    clocks = {c["proc"] for c in events(t, "clock")}
    assert {1, 2, sampler} <= clocks
    # The recording's metadata (its end row) lists both nodes, with their hosts and cores.
    rec = open_recording(path)
    for _ in rec.batches():
        pass
    listed = {n["node"]: n for n in rec.end.nodes}
    assert set(listed) == {"node-a", "node-b"}
    assert listed["node-a"]["cores"] == rec.info.cores and listed["node-b"]["cores"] >= 1
    assert all(n["host"] for n in listed.values())
    summary = json.loads(marlwatch("summary", "--json", str(path)).stdout)
    assert [n["node"] for n in summary["nodes"]] == ["node-a", "node-b"]
    text = marlwatch("summary", str(path)).stdout
    assert f"node-b {listed['node-b']['host']} (" in text and "node-b/cpu0" in text, text
    assert {p["node"] for p in summary["procs"] if p["role"].startswith("worker")} == {"node-a", "node-b"}


@pytest.mark.timeout(500)
def test_cores_panel_groups_cores_by_node(lost_node_run):
    from marlwatch.app.replay import ReplayApp
    from marlwatch.app.widgets import CoresPanel, WorkerRow
    from marlwatch.cli.files import load_replay as load

    path = lost_node_run[0]

    async def scenario() -> None:
        playback, status, size = load(str(path))
        app = ReplayApp(playback, str(path), size, status, play=False, at_s=1e9)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(1.0)
            text = app.query_one(CoresPanel).plain
            assert "node-a/cpu0" in text and "node-b/cpu0" in text, text
            workers = " ".join(w.plain for w in app.query(WorkerRow))
            assert "node-b" in workers
            lost = [w for w in app.query(WorkerRow) if w.has_class("-crashed")]
            assert len(lost) == 1 and re.search(r"Ray actor [0-9a-f]{8} on node-b", lost[0].plain), workers

    asyncio.run(scenario())


def test_nothing_left_after_the_cluster_run(lost_node_run):
    # The run ended (its learner, actors and samplers); the cluster is the test's own and goes at
    # the module's end. Only the run's processes are checked here: no reaper, no learner.
    leftovers = [c for c in left_behind(set(), wait_s=0) if "marlwatch-reaper" in c]
    assert not leftovers
