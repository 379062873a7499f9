"""A user's own Ray program under `marlwatch run -- python examples/my_ray_train.py`, unmodified:
its actors connect on their own (a local ray.init passes the environment on), are named by their
class, and the auto phases run inside them."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from tests.conftest import REPO, marlwatch
from tests.ray_helpers import events, kill_left, left_behind, ray_processes, table

# One xdist worker runs every Ray test: each checks that no Ray process is left on the machine.
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray (the test extra)"), pytest.mark.xdist_group("ray")]


@pytest.mark.timeout(300)
def test_actors_of_a_users_ray_program_connect_with_auto_phases(tmp_path):
    before = ray_processes()
    path = tmp_path / "own.arrow"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray on the loopback address only
    try:
        r = marlwatch("run", "--headless", "--record", str(path), "--", sys.executable,
                      str(REPO / "examples" / "my_ray_train.py"), "4", timeout=280, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not left_behind(before)
    finally:
        kill_left(before)
    t = table(path)
    actors = {e["proc"] for e in events(t, "started") if e.get("role") == "ray actor Sampler"}
    assert len(actors) == 2
    spans = t.filter(t["kind"].to_numpy(zero_copy_only=False) == "span").to_pylist()
    by_slot: dict[int, set[str]] = {}
    for s in spans:
        by_slot.setdefault(s["proc"], set()).add(s["name"])
    for slot in actors:
        assert "sample/env_step" in by_slot.get(slot, set())
    assert "update/backward" in by_slot.get(0, set())  # the driver's own auto phases
    summary = json.loads(marlwatch("summary", "--json", str(path)).stdout)
    # Every step of every actor, the last call's too: Ray ends its workers without atexit, so
    # what a task recorded is shipped when it returns (4 iterations x 2 actors x 100 steps).
    assert summary["phases"]["sample/env_step"]["count"] == 4 * 2 * 100
