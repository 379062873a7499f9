"""Building blocks every algorithm shares: seeding, networks, buffers, env stepping, weights."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from marlwatch import instrument


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mlp(n_in: int, n_out: int, hidden: Iterable[int] = (64, 64), act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = n_in
    for h in hidden:
        layers += [nn.Linear(last, h), act()]
        last = h
    layers.append(nn.Linear(last, n_out))
    return nn.Sequential(*layers)


def gumbel_softmax(logits: torch.Tensor, temperature: float = 1.0, hard: bool = False) -> torch.Tensor:
    """Differentiable sample of a categorical (straight-through one-hot when `hard`)."""
    return F.gumbel_softmax(logits, tau=temperature, hard=hard)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.mul_(1.0 - tau).add_(s, alpha=tau)


def to_numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_numpy_state(module: nn.Module, state: dict[str, np.ndarray]) -> None:
    module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})


class ReplayBuffer:
    """A ring buffer of fixed-shape fields, preallocated (pages are only touched when filled)."""

    def __init__(self, capacity: int, shapes: dict[str, tuple[int, ...]], dtype: Any = np.float32) -> None:
        self.capacity = capacity
        self.data = {k: np.empty((capacity, *shape), dtype=dtype) for k, shape in shapes.items()}
        self.size = 0
        self._next = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        n = len(next(iter(batch.values())))
        idx = (self._next + np.arange(n)) % self.capacity
        for k, arr in self.data.items():
            arr[idx] = batch[k]
        self._next = int((self._next + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample_index(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.size, size=batch_size)

    def get(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(arr[idx]) for k, arr in self.data.items()}


class ParallelEnvRunner:
    """Steps a PettingZoo ParallelEnv as stacked arrays ([agents, ...]) and reports each
    finished episode's team return as the gauge `episode_return`."""

    def __init__(self, env: Any, seed: int) -> None:
        self.env = env
        self.agents = list(env.possible_agents)
        self.n = len(self.agents)
        obs, _ = env.reset(seed=seed)
        self.obs = self._stack(obs)
        self.obs_dim = self.obs.shape[1]
        self.n_actions = int(env.action_space(self.agents[0]).n)
        self.episode_return = 0.0
        self.episode_len = 0
        self.returns: list[float] = []

    def _stack(self, d: dict[str, Any]) -> np.ndarray:
        return np.stack([np.asarray(d[a], dtype=np.float32) for a in self.agents])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Returns (obs before the step, rewards [agents], next obs, episode ended)."""
        with instrument.span("sample/env_step"):
            obs, rew, term, trunc, _ = self.env.step({a: int(actions[i]) for i, a in enumerate(self.agents)})
        prev = self.obs
        rewards = np.array([rew[a] for a in self.agents], dtype=np.float32)
        done = all(term.values()) or all(trunc.values()) or not obs
        next_obs = self._stack(obs) if obs else prev
        self.episode_return += float(rewards.sum())
        self.episode_len += 1
        if done:
            instrument.gauge("episode_return", self.episode_return)
            instrument.counter("episodes")
            self.returns.append(self.episode_return)
            self.episode_return, self.episode_len = 0.0, 0
            obs, _ = self.env.reset()
            self.obs = self._stack(obs)
        else:
            self.obs = next_obs
        return prev, rewards, next_obs, done
