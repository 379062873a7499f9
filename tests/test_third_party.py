"""Training loops nobody here wrote, watched with no code changes (issue 12, item 5).

Each loop in tests/third_party/ is a library's own tutorial, cut to a few thousand environment
steps. It runs under the real command line, `marlwatch run --headless --record FILE -- python
LOOP`, and the recording must show what a user would look for: IPS from the auto iterations, the
auto phases with shares that add up as docs/metrics.md says, and spans from every process that
stepped an environment (SB3's SubprocVecEnv steps its environments in child processes, which
connect on their own). The step and update counts are fixed by each loop's sizes, so the
recording's are checked exactly: a step recorded twice (a wrapper's step nested in the env's) or a
child that never connected changes them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from marlwatch.recording import open_recording
from tests.conftest import REPO, marlwatch

# One worker runs the module, so each loop (`watched`, ~10 s) runs once, not once per xdist worker.
pytestmark = [pytest.mark.timeout(420), pytest.mark.xdist_group("third_party")]

ENV_STEP, BACKWARD, OPTIMIZER = "sample/env_step", "update/backward", "update/optimizer"


@dataclass(frozen=True)
class Loop:
    script: str
    iterations: int  # sample-then-update cycles the loop runs
    updates: int  # minibatch updates in all: one backward pass and one optimizer step each
    steps: dict[str, int]  # "main" / "child": env_step spans of each process that steps an env
    children: int  # processes other than the command's own that step an environment
    helpers: tuple[str, ...]  # multiprocessing's helpers it starts, found in its tree and named


LOOPS = {
    # 2 envs x 128 steps per rollout, 4 rollouts (1024 steps); 4 epochs of 256/64 minibatches each.
    # The main process steps the VecEnv (512 calls), each worker its own env (512 steps).
    "sb3_ppo_subproc": Loop("sb3_ppo_subproc.py", iterations=4, updates=4 * 4 * 4,
                            steps={"main": 512, "child": 512}, children=2,
                            helpers=("multiprocessing.forkserver", "multiprocessing.resource_tracker")),
    # 4 batches of 200 frames, plus the 3-step rollout of check_env_specs; 4 epochs of 200/50.
    "torchrl_mappo_simple_spread": Loop("torchrl_mappo_simple_spread.py", iterations=4, updates=4 * 4 * 4,
                                        steps={"main": 4 * 200 + 3}, children=0,
                                        helpers=("multiprocessing.resource_tracker",)),
}


@pytest.fixture(scope="module", params=sorted(LOOPS))
def watched(request, tmp_path_factory):
    """One run of a loop under `marlwatch run`: (loop, recording path, summary --json)."""
    loop = LOOPS[request.param]
    path = tmp_path_factory.mktemp(request.param) / "out.arrow"
    # One OpenMP thread per process, as the built-in runs have: on 2 cores torch's spinning threads
    # in three processes make the loop several times slower (a setting of the environment, not of
    # the loop).
    # SB3's logger writes to tempdir/SB3-<date> unless told where: keep it with the test's files.
    env = dict(os.environ, OMP_NUM_THREADS="1", SB3_LOGDIR=str(path.parent))
    proc = marlwatch("run", "--headless", "--record", str(path), "--",
                     sys.executable, str(REPO / "tests" / "third_party" / loop.script), timeout=360, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = marlwatch("summary", "--json", str(path))
    assert summary.returncode == 0, summary.stderr
    return loop, path, json.loads(summary.stdout)


def test_summary_shows_ips_and_the_auto_phases(watched):
    loop, _, s = watched
    assert s["status"] == "complete"
    assert s["iterations"] == loop.iterations and s["ips"] > 0
    phases = s["phases"]
    assert {ENV_STEP, BACKWARD, OPTIMIZER} <= set(phases)
    assert all(phases[p]["count"] > 0 and phases[p]["total_s"] > 0 for p in (ENV_STEP, BACKWARD, OPTIMIZER))


def test_shares_add_up_as_documented(watched):
    """docs/metrics.md: sample, update, sync and other add up to 100%; a nested phase's share is
    part of its parent's. These loops have no spans of their own, so each top-level share is
    exactly the sum of the auto phases under it."""
    _, _, s = watched
    shares = s["shares"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["sample"] > 0 and shares["update"] > 0
    for top in ("sample", "update", "sync"):
        under = [v["share"] for k, v in s["phases"].items() if k.startswith(top + "/") and v["depth"] == 1]
        assert sum(under) == pytest.approx(shares[top], abs=1e-9)
    assert s["phases"][ENV_STEP]["share"] == pytest.approx(shares["sample"], abs=1e-9)
    assert s["phases"][BACKWARD]["share"] + s["phases"][OPTIMIZER]["share"] == pytest.approx(shares["update"],
                                                                                               abs=1e-9)


def test_recording_holds_every_step_and_update_of_every_process(watched):
    """The raw rows (summary leaves out each process's first iteration, docs/metrics.md): every
    environment step of every process that stepped one, once, and every update, once."""
    loop, path, s = watched
    table = open_recording(path).read_all()
    spans = table.filter(pc.equal(table["kind"], "span"))

    def per_proc(name: str) -> dict[int, int]:
        rows = spans.filter(pc.equal(spans["name"], name))
        return {r["values"]: r["counts"] for r in pc.value_counts(rows["proc"]).to_pylist()}

    steps = per_proc(ENV_STEP)
    assert steps.pop(0) == loop.steps["main"]  # slot 0: the command's own process
    assert sorted(steps.values()) == [loop.steps.get("child", 0)] * loop.children
    # each stepping child is a process of its own, which the monitor saw with its own pid
    pids = {p["slot"]: p["pid"] for p in s["procs"]}
    assert len({pids[slot] for slot in steps} | {pids[0]}) == loop.children + 1
    assert per_proc(BACKWARD) == {0: loop.updates} and per_proc(OPTIMIZER) == {0: loop.updates}
    # the auto phases are top-level here (the loops have no spans of their own)
    auto = spans.filter(pc.is_in(spans["name"], pa.array([ENV_STEP, BACKWARD, OPTIMIZER])))
    assert auto["parent"].null_count == auto.num_rows
    roles = [p["role"] for p in s["procs"]]
    assert all(any(r.endswith(f"({h})") for r in roles) for h in loop.helpers), roles
    ticks = table.filter(pc.and_(pc.equal(table["kind"], "iter"), pc.equal(table["proc"], 0)))
    assert ticks.num_rows == loop.iterations
