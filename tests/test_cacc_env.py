"""The CACC platoon env is a real PettingZoo ParallelEnv with a line neighbour graph."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from algorithms.envs import make_env
from algorithms.envs.cacc import ACCELERATIONS, CACCEnv


@pytest.mark.parametrize("scenario", ["catchup", "slowdown"])
@pytest.mark.parametrize("agents", [1, 2, 8])
def test_parallel_api(agents: int, scenario: str) -> None:
    parallel_api_test(CACCEnv(agents=agents, max_cycles=60, scenario=scenario), num_cycles=200)


def test_registered_and_line_graph() -> None:
    env = make_env("cacc", 4, 60)
    expected = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=bool)
    assert (env.neighbours == expected).all()


def test_observation_holds_own_and_neighbour_state() -> None:
    env = CACCEnv(agents=3)
    obs, _ = env.reset(seed=1)
    own = env._local()
    np.testing.assert_allclose(obs["vehicle_1"][0:4], own[1], atol=1e-6)
    np.testing.assert_allclose(obs["vehicle_1"][4:8], own[0], atol=1e-6)  # the vehicle in front
    np.testing.assert_allclose(obs["vehicle_1"][8:12], own[2], atol=1e-6)  # the vehicle behind
    assert obs["vehicle_0"][12] == 0.0 and obs["vehicle_2"][13] == 0.0  # no neighbour there


def _episode(env: CACCEnv, policy) -> tuple[float, int]:
    obs, _ = env.reset(seed=3)
    total, steps = 0.0, 0
    while env.agents:
        obs, rew, *_ = env.step({a: policy(obs[a]) for a in env.agents})
        total += sum(rew.values())
        steps += 1
    return total, steps


def test_a_controller_beats_random_driving() -> None:
    """The task is learnable: a feedback law keeps the platoon together, random driving crashes."""
    env = CACCEnv(agents=4, max_cycles=60)
    rng = np.random.default_rng(0)

    def feedback(o: np.ndarray) -> int:
        u = 1.0 * o[0] + 5.0 * o[2] - 1.5 * o[1]
        return int(np.argmin(np.abs(ACCELERATIONS - u)))

    good, good_steps = _episode(env, feedback)
    bad, bad_steps = _episode(env, lambda o: int(rng.integers(len(ACCELERATIONS))))
    assert good_steps == 60 and bad_steps < 60
    assert good > bad + 100


def test_bad_scenario() -> None:
    with pytest.raises(ValueError, match="scenario"):
        CACCEnv(scenario="uphill")
