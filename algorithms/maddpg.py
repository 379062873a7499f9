"""MADDPG (Lowe et al. 2017): centralised critics, decentralised actors, Gumbel-softmax actions.

Defaults follow openai/maddpg `experiments/train.py`: 2x64 ReLU MLPs, Adam lr 1e-2, gamma 0.95,
batch 1024, buffer 1e6, 25-step episodes, an update every 100 env steps, soft target updates with
tau 0.01, gradient norm clipped at 0.5. One exception: the original waits for 1024*25 transitions
before its first update (`--set warmup=25600`); the default here waits for 2048, so a demo run
shows updates within seconds (README's learning table is measured with it).

Taxonomy: CTDE, no explicit messages. Its training-time communication is the centralised
critic's input: every agent's critic needs all agents' observations and (target) actions, so each
update runs N target actors for each of N critics (N^2 actor passes). marlwatch times that as
`update/comm/joint_inputs`; with `centralised_critic=False` the same code is independent DDPG
learners (each critic sees its own observation and action: no communication at all).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Payload, Weights
from algorithms.common import (
    ParallelEnvRunner,
    ReplayBuffer,
    ReplayWarmup,
    gumbel_softmax,
    load_numpy_state,
    mlp,
    seed_everything,
    soft_update,
    to_numpy_state,
    worker_runner,
    worker_share,
)
from algorithms.configs import MADDPGConfig
from algorithms.envs import make_env
from marlwatch import instrument

span = instrument.span


def _actors(n: int, obs_dim: int, n_actions: int, hidden: int) -> nn.ModuleList:
    return nn.ModuleList(mlp(obs_dim, n_actions, (hidden, hidden)) for _ in range(n))


def _env_dims(cfg: MADDPGConfig) -> tuple[int, int, int]:
    env = make_env(cfg.env, cfg.agents, cfg.max_cycles)
    runner = ParallelEnvRunner(env, seed=cfg.seed)
    return runner.n, runner.obs_dim, runner.n_actions


class MADDPGRollout:
    """A worker: decentralised actors choose actions from their own observations."""

    def __init__(self, cfg: MADDPGConfig, worker_index: int) -> None:
        self.cfg = cfg
        self.runner = worker_runner(cfg, worker_index)
        self.actors = _actors(self.runner.n, self.runner.obs_dim, self.runner.n_actions, cfg.hidden)
        self.steps = worker_share(cfg.steps_per_iteration, cfg.workers)

    def load_weights(self, weights: Weights) -> None:
        load_numpy_state(self.actors, weights["actors"])

    @torch.no_grad()
    def collect(self) -> Payload:
        r = self.runner
        n, d, a = self.steps, r.obs_dim, r.n_actions
        out = {
            "obs": np.empty((n, r.n, d), np.float32),
            "act": np.zeros((n, r.n, a), np.float32),
            "rew": np.empty((n, r.n), np.float32),
            "next_obs": np.empty((n, r.n, d), np.float32),
            "done": np.empty((n,), np.float32),
        }
        for t in range(n):
            with span("sample/act"):
                obs_t = torch.from_numpy(r.obs)
                logits = torch.stack([actor(obs_t[i]) for i, actor in enumerate(self.actors)])
                actions = gumbel_softmax(logits).argmax(-1).numpy()
            obs, rew, next_obs, done = r.step(actions)
            # No span for these stores: ~4 us of work, and a span costs ~1 us between this process
            # and the monitor (docs/instrumentation.md, "What to wrap"). The time counts in `sample`.
            out["obs"][t], out["rew"][t], out["next_obs"][t], out["done"][t] = obs, rew, next_obs, done
            out["act"][t, np.arange(r.n), actions] = 1.0
        return out


class MADDPGLearner:
    def __init__(self, cfg: MADDPGConfig) -> None:
        seed_everything(cfg.seed)
        self.cfg = cfg
        self.n, self.obs_dim, self.n_actions = _env_dims(cfg)
        n, d, a, h = self.n, self.obs_dim, self.n_actions, cfg.hidden
        critic_in = n * (d + a) if cfg.centralised_critic else d + a
        self.actors = _actors(n, d, a, h)
        self.critics = nn.ModuleList(mlp(critic_in, 1, (h, h)) for _ in range(n))
        self.target_actors = copy.deepcopy(self.actors)
        self.target_critics = copy.deepcopy(self.critics)
        self.actor_opt = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in self.actors]
        self.critic_opt = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in self.critics]
        self.buffer = ReplayBuffer(
            cfg.buffer_size, {"obs": (n, d), "act": (n, a), "rew": (n,), "next_obs": (n, d), "done": ()}
        )
        self.rng = np.random.default_rng(cfg.seed)
        self.warming_up = ReplayWarmup(cfg.warmup)

    def weights(self) -> Weights:
        return {"actors": to_numpy_state(self.actors)}

    def _critic_input(self, i: int, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        if self.cfg.centralised_critic:
            return torch.cat([obs.flatten(1), act.flatten(1)], dim=1)
        return torch.cat([obs[:, i], act[:, i]], dim=1)

    def update(self, payloads: list[Payload]) -> dict[str, float]:
        cfg = self.cfg
        with span("update/store"):
            for p in payloads:
                self.buffer.add(p)
        if self.warming_up(self.buffer.size):
            return {}
        with span("update/sample_batch"):
            b = self.buffer.get(self.buffer.sample_index(cfg.batch_size, self.rng))
        stats: dict[str, float] = {}
        for i in range(self.n):
            # Each agent's trainer recomputes every agent's target action, as the original does.
            with span("update/comm/joint_inputs" if cfg.centralised_critic else "update/target_inputs"):
                with torch.no_grad():
                    if cfg.centralised_critic:
                        next_act = torch.stack(
                            [gumbel_softmax(self.target_actors[j](b["next_obs"][:, j])) for j in range(self.n)], dim=1
                        )
                    else:
                        next_act = b["act"].clone()
                        next_act[:, i] = gumbel_softmax(self.target_actors[i](b["next_obs"][:, i]))
                    target_in = self._critic_input(i, b["next_obs"], next_act)
                    q_next = self.target_critics[i](target_in).squeeze(-1)
                    y = b["rew"][:, i] + cfg.gamma * (1.0 - b["done"]) * q_next
            with span("update/critic"):
                q = self.critics[i](self._critic_input(i, b["obs"], b["act"])).squeeze(-1)
                critic_loss = F.mse_loss(q, y)
                self.critic_opt[i].zero_grad()
                critic_loss.backward()
                nn.utils.clip_grad_norm_(self.critics[i].parameters(), cfg.grad_clip)
                self.critic_opt[i].step()
            with span("update/actor"):
                logits = self.actors[i](b["obs"][:, i])
                act = b["act"].clone()
                act[:, i] = gumbel_softmax(logits)
                actor_loss = -self.critics[i](self._critic_input(i, b["obs"], act)).mean() + 1e-3 * (logits**2).mean()
                self.actor_opt[i].zero_grad()
                actor_loss.backward()
                nn.utils.clip_grad_norm_(self.actors[i].parameters(), cfg.grad_clip)
                self.actor_opt[i].step()
            stats[f"loss/critic_{i}"] = critic_loss.item()
            stats[f"loss/actor_{i}"] = actor_loss.item()
        with span("update/target"):
            for i in range(self.n):
                soft_update(self.target_actors[i], self.actors[i], cfg.tau)
                soft_update(self.target_critics[i], self.critics[i], cfg.tau)
        return stats
