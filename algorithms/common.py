"""Building blocks every algorithm shares: seeding, networks, buffers, env stepping, weights.

Every algorithm: `worker_runner` (a worker's env with the one seed rule), `worker_share` (a
worker's part of the iteration's work), `stack_payloads` (the workers' payloads side by side).

On-policy pieces (A2C-style algorithms: tom2c, tarmac, neurcomm): `play_episodes` (a worker's
episode loop, whole episodes [episodes, T, agents, ...]), `episode_advantages` (GAE over whole
episodes, bootstrapping those the time limit cut), built on `compute_gae(rewards, values, dones,
last_value, gamma, lam) -> (advantages, returns)` and `discounted_returns(rewards, dones,
last_value, gamma)` (time-first tensors) and `bootstrap_truncated`; `a2c_loss`, and
`attention(q, k, v, mask) -> (out, weights)` (scaled dot-product over agents).
"""

from __future__ import annotations

import math
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


def worker_runner(cfg: Any, worker_index: int, env: Any = None) -> ParallelEnvRunner:
    """Worker `worker_index`'s env runner, seeded by the one rule every algorithm follows: the
    worker's random, numpy and torch streams from cfg.seed + 1000 * (worker_index + 1) (apart
    from each other and from the learner's cfg.seed), its env from cfg.seed + worker_index.
    `env`: an env already made (default: `make_env(cfg.env, cfg.agents, cfg.max_cycles)`)."""
    from algorithms.envs import make_env

    seed_everything(cfg.seed + 1000 * (worker_index + 1))
    if env is None:
        env = make_env(cfg.env, cfg.agents, cfg.max_cycles)
    return ParallelEnvRunner(env, seed=cfg.seed + worker_index)


def worker_share(total: int, workers: int) -> int:
    """One worker's part of `total` (episodes or steps an iteration collects), rounded up: the
    workers together collect at least `total`."""
    return -(-total // workers)


def stack_payloads(payloads: list[dict[str, np.ndarray]], keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The workers' payloads side by side along their first axis (episodes or steps), as tensors."""
    return {k: torch.from_numpy(np.concatenate([p[k] for p in payloads])) for k in (keys or payloads[0])}


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


class ReplayWarmup:
    """An off-policy learner's warm-up: no update until its replay buffer holds `needed`
    transitions. Calling it with the buffer's size reports the progress (`marlwatch.warmup`) each
    iteration until the warm-up is over and once more when it is, then nothing."""

    def __init__(self, needed: int) -> None:
        self.needed = needed
        self.over = needed <= 0

    def __call__(self, stored: int) -> bool:
        """True while the learner should still wait."""
        if self.over:
            return False
        instrument.warmup(min(stored, self.needed), self.needed)
        self.over = stored >= self.needed
        return not self.over


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
        # Ended by the task (no value after it) rather than by the time limit (bootstrap from next_obs).
        self.terminated = bool(term) and all(term.values())
        next_obs = self._stack(obs) if obs else prev
        self.episode_return += float(rewards.sum())
        if done:
            instrument.gauge("episode_return", self.episode_return)
            instrument.counter("episodes")
            self.returns.append(self.episode_return)
            self.episode_return = 0.0
            obs, _ = self.env.reset()
            self.obs = self._stack(obs)
        else:
            self.obs = next_obs
        return prev, rewards, next_obs, done


# --- On-policy pieces -------------------------------------------------------------------


class EpisodeStorage:
    """Whole episodes, preallocated: each field is [episodes, T, *shape]; `mask` marks the steps
    that happened (an episode that ends before T leaves its tail masked out)."""

    def __init__(self, episodes: int, steps: int, shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, Any] | None = None) -> None:
        dtypes = dtypes or {}
        self.data = {k: np.zeros((episodes, steps, *shape), dtype=dtypes.get(k, np.float32))
                     for k, shape in shapes.items()}
        self.data["mask"] = np.zeros((episodes, steps), dtype=np.float32)


def play_episodes(runner: ParallelEnvRunner, episodes: int, steps: int,
                  act: Any, extra_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Play `episodes` whole episodes of at most `steps` steps. `act(obs [agents, obs_dim], t)`
    returns (actions [agents] ints, extras dict of arrays to store at this step); `t == 0` tells
    a recurrent policy to reset its state. Stores obs, act, rew, done (1 on an episode's last step),
    mask, plus the extras, and per episode `terminal` (1 if the task ended it, 0 if the time limit
    did) and `last_obs` [episodes, agents, obs_dim] (the observation after the last step, to
    bootstrap a truncated episode: see `bootstrap_truncated`). Leaves the runner at the start of
    a fresh episode."""
    n, d = runner.n, runner.obs_dim
    shapes = {"obs": (n, d), "act": (n,), "rew": (n,), "done": (), **(extra_shapes or {})}
    store = EpisodeStorage(episodes, steps, shapes, {"act": np.int64})
    data = store.data
    data["terminal"] = np.zeros((episodes,), np.float32)
    data["last_obs"] = np.zeros((episodes, n, d), np.float32)
    for e in range(episodes):
        for t in range(steps):
            actions, extras = act(runner.obs, t)
            obs, rew, next_obs, done = runner.step(actions)
            # Not a span: ~2 us of stores per step (docs/instrumentation.md, "What to wrap").
            data["obs"][e, t], data["act"][e, t], data["rew"][e, t] = obs, actions, rew
            data["mask"][e, t] = 1.0
            for k, v in extras.items():
                data[k][e, t] = v
            if done or t == steps - 1:
                data["done"][e, t] = 1.0
                data["terminal"][e] = float(done and runner.terminated)
                data["last_obs"][e] = next_obs
                if not done:  # episode longer than `steps`: cut it so the next one starts fresh
                    runner.episode_return = 0.0
                    obs0, _ = runner.env.reset()
                    runner.obs = runner._stack(obs0)
                break
    return data


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, time first: rewards/values [T, ...], dones [T, ...]
    broadcastable to them (1 where the episode ended at that step: no bootstrap past it),
    last_value [...] the value after step T-1. Returns (advantages, returns = advantages + values)."""
    adv = torch.zeros_like(rewards)
    gae = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        next_value = last_value if t == rewards.shape[0] - 1 else values[t + 1]
        live = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * live - values[t]
        gae = delta + gamma * lam * live * gae
        adv[t] = gae
    return adv, adv + values


def bootstrap_truncated(rewards: torch.Tensor, done: torch.Tensor, terminal: torch.Tensor,
                        last_value: torch.Tensor, gamma: float) -> torch.Tensor:
    """Episodes first: rewards [E, T, ...], done [E, T] (1 on each episode's last step), terminal
    [E], last_value [E, ...] = V(last_obs). Adds gamma * V(last_obs) to the last reward of every
    episode the time limit cut, so GAE / returns that stop at `done` still see the future the
    cut hid (the value of a state then does not depend on the clock, which it cannot observe)."""
    extra = (gamma * last_value * (1.0 - terminal).reshape(-1, *[1] * (last_value.dim() - 1)))
    d = done.reshape(*done.shape, *[1] * (rewards.dim() - done.dim()))
    return rewards + d * extra.unsqueeze(1)


def episode_advantages(rewards: torch.Tensor, values: torch.Tensor, done: torch.Tensor, gamma: float, lam: float,
                       terminal: torch.Tensor | None = None, last_values: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over whole episodes, episodes first: rewards and values [E, T, N], done [E, T] (1 on
    each episode's last step). With `terminal` [E] and `last_values` [E, N] = V(last_obs), the
    episodes the time limit cut bootstrap from their last observation (`bootstrap_truncated`);
    without, an episode's end is its end. Returns (advantages, returns), [E, T, N]."""
    if last_values is not None:
        assert terminal is not None, "bootstrapping needs to know which episodes the task ended"
        rewards = bootstrap_truncated(rewards, done, terminal, last_values, gamma)
    adv, ret = compute_gae(rewards.transpose(0, 1), values.detach().transpose(0, 1), done.transpose(0, 1)[..., None],
                           torch.zeros_like(values[:, 0]), gamma, lam)
    return adv.transpose(0, 1), ret.transpose(0, 1)


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
                       gamma: float) -> torch.Tensor:
    """n-step discounted returns, time first (same conventions as `compute_gae`)."""
    ret = torch.zeros_like(rewards)
    running = last_value.expand_as(rewards[0]).clone()
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * running * (1.0 - dones[t])
        ret[t] = running
    return ret


def a2c_loss(logits: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             returns: torch.Tensor, mask: torch.Tensor | None = None, value_coef: float = 0.5,
             entropy_coef: float = 0.01, normalize: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantage actor-critic loss over any leading shape: logits [..., A], the rest [...].
    `mask` (0/1, broadcastable) drops steps that did not happen. Returns (loss, float gauges)."""
    m = torch.ones_like(advantages) if mask is None else mask.expand_as(advantages)
    count = m.sum().clamp(min=1.0)
    adv = advantages.detach()
    if normalize:
        mean = (adv * m).sum() / count
        std = (((adv - mean) ** 2 * m).sum() / count).sqrt()
        adv = (adv - mean) / (std + 1e-8)
    dist = torch.distributions.Categorical(logits=logits)
    policy_loss = -(dist.log_prob(actions) * adv * m).sum() / count
    value_loss = (((returns.detach() - values) ** 2) * m).sum() / count
    entropy = (dist.entropy() * m).sum() / count
    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy
    return loss, {"loss/policy": policy_loss.item(), "loss/value": value_loss.item(), "entropy": entropy.item()}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention: q [..., Nq, d], k [..., Nk, d], v [..., Nk, dv], mask
    [..., Nq, Nk] (True = may attend). Returns (out [..., Nq, dv], weights [..., Nq, Nk]);
    each query's weights sum to 1 (a query with nothing to attend to gets zero weights)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = torch.nan_to_num(weights, nan=0.0)
    return weights @ v, weights


def env_dims(env: str, agents: int, max_cycles: int = 25) -> tuple[int, int, int]:
    """(agents, observation size, number of discrete actions) of an env, for building networks."""
    from algorithms.envs import make_env

    runner = ParallelEnvRunner(make_env(env, agents, max_cycles), seed=0)
    return runner.n, runner.obs_dim, runner.n_actions
