"""The nodes of a run across machines in the recording's metadata (the end row's ``nodes``) and in
`summary`, from a real `marlwatch listen` and two processes that say they run on two nodes (as
Ray actors do; the two-node Ray cluster test checks the same with Ray: tests/test_ray_cluster.py);
and the reader's checks on what an end row says."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from marlwatch.recording import RunEnd, open_recording
from tests.watch_helpers import env_with_repo, listen_with

# argv: node id, host, and the cores this node's sampler reports ("" for none: the monitor's node)
ON_A_NODE = r'''
import os, sys, time
from marlwatch import instrument
node_id, host, cores = sys.argv[1], sys.argv[2], sys.argv[3]
tel = instrument.connect_monitor(os.environ["MARLWATCH_ADDRESS"], bytes.fromhex(os.environ["MARLWATCH_AUTHKEY"]),
                                 role=f"on {host}", pid=os.getpid(), node={"id": node_id, "host": host, "ip": ""})
if not cores:  # the first process: the monitor's node, which names the cluster's nodes
    tel.control({"type": "nodes", "local": node_id, "nodes": [{"id": node_id, "host": host, "ip": ""},
                                                              {"id": "B" * 8, "host": "host-b", "ip": ""}]})
else:
    tel.control({"type": "sys", "cores": [float(c) for c in cores.split(",")], "procs": []})
time.sleep(0.5)
tel.close()
print("done", flush=True)
'''


@pytest.mark.timeout(120)
def test_the_end_row_lists_the_nodes_and_summary_shows_them(tmp_path):
    path = tmp_path / "nodes.arrow"
    listen_with(path, ["-c", ON_A_NODE, "A" * 8, "host-a", ""], ["-c", ON_A_NODE, "B" * 8, "host-b", "10,20,30"],
                timeout=60)
    rec = open_recording(path)
    for _ in rec.batches():
        pass
    assert rec.complete and rec.end is not None
    nodes = {n["node"]: n for n in rec.end.nodes}
    assert set(nodes) == {"node-a", "node-b"}
    assert nodes["node-a"]["host"] == "host-a" and nodes["node-a"]["local"]
    assert nodes["node-a"]["cores"] == rec.info.cores and nodes["node-a"]["first_core"] == 0
    assert nodes["node-b"]["host"] == "host-b" and not nodes["node-b"]["local"]
    assert nodes["node-b"]["cores"] == 3 and nodes["node-b"]["first_core"] == rec.info.cores
    assert rec.end.stop_reason  # the end row's other facts are still there
    # The replay reader (parts) reads the same end row
    rec2 = open_recording(path)
    rec2.parts()
    assert rec2.end == rec.end

    out = subprocess.run([sys.executable, "-m", "marlwatch", "summary", str(path)], env=env_with_repo(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    a_cores = f"{rec.info.cores} core{'s' * (rec.info.cores != 1)}"
    assert f"nodes: node-a host-a ({a_cores}, the monitor)  node-b host-b (3 cores)" in out.stdout, out.stdout
    assert "node-b/cpu2" in out.stdout  # node-b's cores, by node
    js = json.loads(subprocess.run([sys.executable, "-m", "marlwatch", "summary", "--json", str(path)],
                                   env=env_with_repo(), capture_output=True, text=True, timeout=60).stdout)
    assert [(n["node"], n["host"], n["cores"]) for n in js["nodes"]] == [
        ("node-a", "host-a", rec.info.cores), ("node-b", "host-b", 3)]


def test_an_end_row_says_what_it_can():
    assert RunEnd.parse(None) == RunEnd()
    assert RunEnd.parse("not json") == RunEnd()
    assert RunEnd.parse("[1, 2]") == RunEnd()
    end = RunEnd.parse(json.dumps({"rows": 12, "stop_reason": "q", "failure": None, "nodes": [
        {"node": "node-a", "host": "h", "cores": 2, "first_core": 0, "local": True},
        {"node": "node-b", "host": 7, "cores": "many", "first_core": -1, "local": "yes"},
        {"host": "no name"}, "junk"]}))
    assert end.rows == 12 and end.stop_reason == "q" and end.failure is None
    assert end.nodes == [
        {"node": "node-a", "id": "", "host": "h", "ip": "", "local": True, "cores": 2, "first_core": 0},
        {"node": "node-b", "id": "", "host": "", "ip": "", "local": False, "cores": None, "first_core": None}]
    assert len(RunEnd.parse(json.dumps({"nodes": [{"node": f"n{i}"} for i in range(500)]})).nodes) == 64
