"""Environments by name. Every env is a PettingZoo ParallelEnv with homogeneous agents."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing pettingzoo costs ~0.5 s; the monitor only checks env names
    from pettingzoo import ParallelEnv


def _simple_spread(agents: int, max_cycles: int, **kw: Any) -> ParallelEnv:
    from mpe2 import simple_spread_v3

    return simple_spread_v3.parallel_env(N=agents, max_cycles=max_cycles, continuous_actions=False, **kw)


def _cacc(agents: int, max_cycles: int, **kw: Any) -> ParallelEnv:
    from algorithms.envs.cacc import parallel_env

    return parallel_env(agents=agents, max_cycles=max_cycles, **kw)


ENVS: dict[str, Callable[..., ParallelEnv]] = {
    "simple_spread": _simple_spread,
    "cacc": _cacc,
}


def _simple_spread_sizes(agents: int) -> tuple[int, int]:
    # Own velocity and position (4), every landmark (2N), every other agent's position and its
    # communication channel (2 x 2(N-1)); five moves.
    return 6 * agents, 5


def _cacc_sizes(agents: int) -> tuple[int, int]:
    from algorithms.envs.cacc import ACCELERATIONS, OBS_DIM

    return OBS_DIM, len(ACCELERATIONS)


# (observation size, number of actions) by agent count, without building the env: the monitor
# sizes a run's networks and buffers before it starts it (and before 1000 agents' env exists).
SIZES: dict[str, Callable[[int], tuple[int, int]]] = {
    "simple_spread": _simple_spread_sizes,
    "cacc": _cacc_sizes,
}


def register(name: str, factory: Callable[..., ParallelEnv],
             sizes: Callable[[int], tuple[int, int]] | None = None) -> None:
    ENVS[name] = factory
    if sizes is not None:
        SIZES[name] = sizes


def env_sizes(name: str, agents: int) -> tuple[int, int]:
    """(observation size, number of discrete actions) of an env with this many agents; from
    SIZES, or else from a built env."""
    if name in SIZES:
        return SIZES[name](agents)
    env = make_env(name, agents)
    first = env.possible_agents[0]
    return int(env.observation_space(first).shape[0]), int(env.action_space(first).n)


def make_env(name: str, agents: int, max_cycles: int = 25, **kw: Any) -> ParallelEnv:
    if name not in ENVS:
        raise KeyError(f"unknown env {name!r} (known: {', '.join(sorted(ENVS))})")
    return ENVS[name](agents=agents, max_cycles=max_cycles, **kw)
