"""The machine checks of marlwatch.limits: env sizes without the env, memory estimates against
real learners, the processes-per-core and memory rules (refusals through the real command are
in test_bad_flags.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from algorithms import make_config
from algorithms.envs import env_sizes, make_env
from marlwatch.limits import (
    PROCESS_BYTES,
    WORKERS_PER_CORE,
    LimitError,
    available_memory,
    run_memory,
    usable_cores,
)
from marlwatch.runner import Run, RunConfig
from tests.conftest import REPO


@pytest.mark.parametrize("env, agents", [("simple_spread", 1), ("simple_spread", 2), ("simple_spread", 7),
                                         ("cacc", 2), ("cacc", 9)])
def test_env_sizes_without_the_env_match_the_env(env, agents):
    built = make_env(env, agents)
    first = built.possible_agents[0]
    obs, _ = built.reset(seed=0)
    assert env_sizes(env, agents) == (len(obs[first]), built.action_space(first).n)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("algo, agents, workers, settings", [
    ("maddpg", 6, 1, {"buffer_size": "80000", "warmup": "0"}),  # the buffer dominates
    ("tom2c", 10, 1, {}),  # the N x N x N update dominates
    ("tom2c", 6, 1, {"graph": "per_agent"}),  # N graphs of N x N edges, 192 wide
])
def test_the_estimate_is_a_lower_bound_within_3x_of_a_real_learner(algo, agents, workers, settings):
    """Low enough never to refuse a run that fits, close enough to refuse one that cannot."""
    out = subprocess.run([sys.executable, str(REPO / "tests" / "memory_probe.py"), algo, str(agents), str(workers),
                          json.dumps(settings)], capture_output=True, text=True, timeout=220, cwd=REPO)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["estimate"] > 50 * 2**20, m  # large enough for the comparison to mean something
    # What the learner holds is measured the same way on every machine; what the process takes from
    # the system is more (allocator pools, BLAS buffers: part of PROCESS_BYTES) and machine-dependent.
    assert m["estimate"] <= m["live"] <= 3 * m["estimate"], m
    assert m["estimate"] <= m["rss"], m


def test_more_workers_than_the_rule_allows_are_refused_unless_limits_are_ignored(tmp_path):
    too_many = WORKERS_PER_CORE * usable_cores() + 1
    with pytest.raises(LimitError, match=f"--workers {too_many} is more than {WORKERS_PER_CORE} per core"):
        Run(RunConfig(workers=too_many, record=str(tmp_path / "x.arrow")))
    Run(RunConfig(workers=too_many, record=str(tmp_path / "x.arrow"), ignore_limits=True))  # built, not started
    Run(RunConfig(workers=too_many - 1, record=str(tmp_path / "x.arrow")))
    assert not (tmp_path / "x.arrow").exists()


def _buffer_for(nbytes: int) -> int:
    """A MADDPG buffer_size (3 agents, 1 worker, no end) whose run needs about `nbytes`."""
    small, _ = run_memory(make_config("maddpg", workers=1, settings={"buffer_size": "100000"}), 1, None)
    big, _ = run_memory(make_config("maddpg", workers=1, settings={"buffer_size": "200000"}), 1, None)
    per_row = (big - small) / 100_000
    return max(30_000, int((nbytes - (small - 100_000 * per_row)) / per_row))


def test_a_run_needing_more_memory_than_is_available_is_refused(tmp_path):
    free = available_memory()
    refused = RunConfig(workers=1, iterations=None, record=str(tmp_path / "x.arrow"),
                        settings={"buffer_size": str(_buffer_for(2 * free))})
    with pytest.raises(LimitError, match=r"--agents 3 --workers 1: the run would need at least .* of memory, "
                                         r"mostly the replay buffer .* is available \(--ignore-limits"):
        Run(refused)
    refused.ignore_limits = True
    Run(refused)
    # A run with an end fills only what it stores: the same buffer over 100 iterations fits.
    Run(RunConfig(workers=1, iterations=100, record=str(tmp_path / "x.arrow"), settings=refused.settings))
    # And a run the machine can hold passes.
    need, _ = run_memory(make_config("maddpg", workers=1, settings={"buffer_size": str(_buffer_for(free // 4))}),
                         1, None)
    assert 2 * PROCESS_BYTES < need < free


def test_thousands_of_processes_are_named_as_what_the_memory_goes_to():
    need, biggest = run_memory(make_config("maddpg", workers=1000, settings={"buffer_size": "5000"}), 1000, 10)
    assert need >= 1001 * PROCESS_BYTES and biggest == f"1001 processes of {PROCESS_BYTES >> 20} MB each"
