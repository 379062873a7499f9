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


def register(name: str, factory: Callable[..., ParallelEnv]) -> None:
    ENVS[name] = factory


def make_env(name: str, agents: int, max_cycles: int = 25, **kw: Any) -> ParallelEnv:
    if name not in ENVS:
        raise KeyError(f"unknown env {name!r} (known: {', '.join(sorted(ENVS))})")
    return ENVS[name](agents=agents, max_cycles=max_cycles, **kw)
