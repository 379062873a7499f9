"""Cooperative adaptive cruise control (CACC): a platoon of N vehicles behind a leader.

After the CACC task of Chu et al. 2020 ("Multi-agent reinforcement learning for networked system
control", ICLR; public code cts198859/deeprl_network `envs/cacc_env.py`). Vehicle 0 is the
leader (not an agent) driving a fixed speed profile; vehicles 1..N are the agents. Each step
every agent picks one of a few discrete accelerations; headways and speeds follow

    h_i <- h_i + dt * (v_{i-1} - v_i),    v_i <- clip(v_i + dt * u_i, 0, v_max)

The reward of vehicle i penalises headway error, speed error (the target speed is the
leader's) and acceleration, as in the paper; a collision (headway below `h_min`) ends the
episode for everyone, as in the paper, and costs every vehicle a penalty plus CRASH_STEP_COST
per step cut off. Rewards are scaled so a
step costs O(1), which keeps actor-critic learning well conditioned.

Scenarios (the paper's two): `catchup`: the platoon starts with scattered headways and must
close up to the target headway behind a leader at constant speed; `slowdown`: the platoon
starts at the target headway and the leader slows from 1.5x to 1x the cruise speed during
the first half of the episode, so followers must brake in time.

The communication graph is the platoon's line graph: vehicle i talks to i-1 and i+1.
`env.neighbours` is that adjacency as an [N, N] bool array (no self loops), and each
agent observes its own state and its neighbours' (zero-padded, with a presence flag): the
networked MDP's local view s_{V_i}.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

ACCELERATIONS = np.array([-2.5, -1.25, 0.0, 1.25, 2.5], dtype=np.float64)
"""The discrete action set (m/s^2); the paper bounds acceleration to [-2.5, 2.5]."""

CRASH_STEP_COST = 3.0
"""Per step cut off by a crash; a step with a 17 m headway error costs about that much."""

N_OWN = 4  # own features: headway error, speed error, closing speed, last acceleration
OBS_DIM = 3 * N_OWN + 2  # own + two neighbours' features + two presence flags
OBS_BOUND = 10.0


class CACCEnv(ParallelEnv):
    metadata = {"name": "cacc_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, agents: int = 8, max_cycles: int = 60, scenario: str = "catchup", dt: float = 0.5,
                 h_star: float = 20.0, v_star: float = 15.0, h_min: float = 1.0, h_safe: float = 8.0, v_max: float = 30.0,
                 collision_penalty: float = 20.0, render_mode: str | None = None) -> None:
        if agents < 1:
            raise ValueError("cacc needs at least one vehicle")
        if scenario not in ("catchup", "slowdown"):
            raise ValueError(f"unknown cacc scenario {scenario!r} (known: catchup, slowdown)")
        self.n = agents
        self.max_cycles = max_cycles
        self.scenario = scenario
        self.dt, self.h_star, self.v_star, self.h_min, self.v_max = dt, h_star, v_star, h_min, v_max
        self.h_safe = h_safe
        self.collision_penalty = collision_penalty
        self.render_mode = render_mode
        self.possible_agents = [f"vehicle_{i}" for i in range(agents)]
        self.agents: list[str] = []
        idx = np.arange(agents)
        self.neighbours = np.abs(idx[:, None] - idx[None, :]) == 1
        """[N, N] adjacency of the platoon's line graph: neighbours[i, j] means j talks to i."""
        self._obs_space = spaces.Box(-OBS_BOUND, OBS_BOUND, shape=(OBS_DIM,), dtype=np.float32)
        self._act_space = spaces.Discrete(len(ACCELERATIONS))
        self._rng = np.random.default_rng()
        self.h = np.zeros(agents)
        self.v = np.zeros(agents)
        self.u = np.zeros(agents)
        self.t = 0

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._act_space

    # -- dynamics ---------------------------------------------------------------------------
    def _leader_speed(self, t: int) -> float:
        if self.scenario == "catchup":
            return self.v_star
        half = max(1, self.max_cycles // 2)
        return self.v_star * (1.5 - 0.5 * min(1.0, t / half))

    def _local(self) -> np.ndarray:
        v_lead = self._leader_speed(self.t)
        v_pred = np.concatenate([[v_lead], self.v[:-1]])
        return np.stack([
            (self.h - self.h_star) / 10.0,
            (self.v - v_lead) / 5.0,
            (v_pred - self.v) / 5.0,
            self.u / ACCELERATIONS[-1],
        ], axis=1)

    def _observe(self) -> dict[str, np.ndarray]:
        own = self._local()
        pad = np.zeros((1, N_OWN))
        front = np.concatenate([pad, own[:-1]])  # vehicle i-1 (none for the first follower)
        back = np.concatenate([own[1:], pad])  # vehicle i+1 (none for the last)
        flags = np.ones((self.n, 2))
        flags[0, 0] = 0.0
        flags[-1, 1] = 0.0
        obs = np.clip(np.concatenate([own, front, back, flags], axis=1), -OBS_BOUND, OBS_BOUND).astype(np.float32)
        return {a: obs[i] for i, a in enumerate(self.agents)}

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agents = list(self.possible_agents)
        self.t = 0
        self.u = np.zeros(self.n)
        if self.scenario == "catchup":
            # As in the paper, everyone starts at the cruise speed; only the gaps are off.
            self.h = self.h_star * self._rng.uniform(0.6, 1.6, self.n)
            self.v = self.v_star + self._rng.uniform(-0.5, 0.5, self.n)
        else:
            self.h = self.h_star + self._rng.uniform(-2.0, 2.0, self.n)
            self.v = np.full(self.n, self._leader_speed(0)) + self._rng.uniform(-1.0, 1.0, self.n)
        return self._observe(), {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if not self.agents:
            return {}, {}, {}, {}, {}
        u = np.array([ACCELERATIONS[int(actions[a])] for a in self.agents])
        v_pred_before = np.concatenate([[self._leader_speed(self.t)], self.v[:-1]])
        v_new = np.clip(self.v + self.dt * u, 0.0, self.v_max)
        # Headway changes with the mean of both vehicles' speeds over the step (trapezoid rule).
        self.t += 1
        v_pred_after = np.concatenate([[self._leader_speed(self.t)], v_new[:-1]])
        self.h = self.h + self.dt * 0.5 * ((v_pred_before + v_pred_after) - (self.v + v_new))
        self.v, self.u = v_new, u
        v_lead = self._leader_speed(self.t)
        cost = ((self.h - self.h_star) / 10.0) ** 2 + ((self.v - v_lead) / 5.0) ** 2 + 0.1 * (u / 2.5) ** 2
        # A safety term below h_safe, as the paper's reward has: it warns before the crash does.
        cost += (np.maximum(0.0, self.h_safe - self.h) / 4.0) ** 2
        rewards = -cost
        crashed = bool((self.h < self.h_min).any())
        if crashed:
            # Everyone pays, and pays for the steps a crash cuts off at more than driving on with
            # large errors would cost: otherwise crashing early is a shortcut a learner finds.
            rewards = rewards - self.collision_penalty - CRASH_STEP_COST * (self.max_cycles - self.t)
        obs = self._observe()
        trunc = self.t >= self.max_cycles
        rew = {a: float(rewards[i]) for i, a in enumerate(self.agents)}
        terms = {a: crashed for a in self.agents}
        truncs = {a: trunc and not crashed for a in self.agents}
        infos = {a: {"headway": float(self.h[i]), "speed": float(self.v[i])} for i, a in enumerate(self.agents)}
        if crashed or trunc:
            self.agents = []
        return obs, rew, terms, truncs, infos

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None

    def state(self) -> np.ndarray:
        return self._local().astype(np.float32).ravel()


def parallel_env(agents: int = 8, max_cycles: int = 60, **kw: Any) -> CACCEnv:
    return CACCEnv(agents=agents, max_cycles=max_cycles, **kw)
