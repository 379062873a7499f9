"""TarMAC-style targeted communication (after Das et al. 2019, "TarMAC: Targeted Multi-Agent
Communication") with per-agent learners: the fourth quadrant of the taxonomy.

Taxonomy: decentralised training + learned communication. Every agent has its own networks and
its own optimiser and learns from its own reward with its own critic (A2C with GAE); nothing is
shared and there is no centralised critic. What the agents learn together is what they say:

1. agent i encodes its observation into h_i;
2. it sends a message made of a signature k_i (what the message is about) and a value v_i
   (what it says), and forms a query q_j for what it wants to hear;
3. receiver j attends over the other agents' messages: alpha_ji = softmax_i(q_j . k_i / sqrt(d)),
   c_j = sum_i alpha_ji v_i (targeting: the sender writes k_i, the receiver decides whom to read);
4. j's actor and critic read [h_j, c_j].

Messages are differentiable (as in DIAL): a receiver's loss sends gradients back through the
message into the sender's parameters, and each agent's optimiser then steps its own parameters
with what reached them. `backprop_messages=False` detaches messages at the receiver, which makes
the learners fully independent (messages still flow, but nobody learns what to say).

Simplifications against the paper: one communication round per step, a feed-forward encoder
instead of the GRU policy, so training batches over all steps at once.

Phases: acting `sample/encode`, `sample/comm/signature`, `sample/comm/attention`,
`sample/policy`; training `update/encode`, `update/comm/signature`, `update/comm/attention`,
`update/heads`, `update/gae`, `update/backward`, `update/optim`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Payload, Weights
from algorithms.common import (
    a2c_loss,
    attention,
    env_dims,
    episode_advantages,
    load_numpy_state,
    mlp,
    play_episodes,
    seed_everything,
    stack_payloads,
    to_numpy_state,
    worker_runner,
    worker_share,
)
from algorithms.configs import TarMACConfig
from marlwatch import instrument

span = instrument.span


class AgentNet(nn.Module):
    """One agent's networks: encoder, message heads (signature, value, query), actor, critic."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int, key_dim: int, value_dim: int) -> None:
        super().__init__()
        self.encoder = mlp(obs_dim, hidden, (hidden,))
        self.signature = nn.Linear(hidden, key_dim)
        self.value = nn.Linear(hidden, value_dim)
        self.query = nn.Linear(hidden, key_dim)
        self.actor = mlp(hidden + value_dim, n_actions, (hidden,))
        self.critic = mlp(hidden + value_dim, 1, (hidden,))


def encode(agents: nn.ModuleList, obs: torch.Tensor) -> torch.Tensor:
    """obs [..., N, D] -> h [..., N, H], each agent with its own encoder."""
    return torch.stack([F.relu(a.encoder(obs[..., i, :])) for i, a in enumerate(agents)], dim=-2)


def make_messages(agents: nn.ModuleList, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [..., N, H] -> (signatures [..., N, K], values [..., N, V], queries [..., N, K])."""
    k = torch.stack([a.signature(h[..., i, :]) for i, a in enumerate(agents)], dim=-2)
    v = torch.stack([a.value(h[..., i, :]) for i, a in enumerate(agents)], dim=-2)
    q = torch.stack([a.query(h[..., i, :]) for i, a in enumerate(agents)], dim=-2)
    return k, v, q


def targeted_attention(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each receiver j reads the other agents' messages: (c [..., N, V], weights [..., N recv, N send])."""
    n = k.shape[-2]
    others = ~torch.eye(n, dtype=torch.bool)
    return attention(q, k, v, others)


def heads(agents: nn.ModuleList, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (action logits [..., N, A], values [..., N]), each agent with its own actor and critic."""
    x = torch.cat([h, c], dim=-1)
    logits = torch.stack([a.actor(x[..., i, :]) for i, a in enumerate(agents)], dim=-2)
    values = torch.stack([a.critic(x[..., i, :]).squeeze(-1) for i, a in enumerate(agents)], dim=-1)
    return logits, values


def _agents(cfg: TarMACConfig, n: int, obs_dim: int, n_actions: int) -> nn.ModuleList:
    return nn.ModuleList(AgentNet(obs_dim, n_actions, cfg.hidden, cfg.key_dim, cfg.value_dim) for _ in range(n))


# --- Worker: plays whole episodes -------------------------------------------------------


class TarMACRollout:
    def __init__(self, cfg: TarMACConfig, worker_index: int) -> None:
        self.cfg = cfg
        self.runner = worker_runner(cfg, worker_index)
        self.episodes = worker_share(cfg.episodes_per_iteration, cfg.workers)
        self.agents = _agents(cfg, self.runner.n, self.runner.obs_dim, self.runner.n_actions)

    def load_weights(self, weights: Weights) -> None:
        load_numpy_state(self.agents, weights["agents"])

    def act(self, obs_np: np.ndarray, t: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        obs = torch.from_numpy(obs_np)
        with span("sample/encode"):
            h = encode(self.agents, obs)
        with span("sample/comm/signature"):
            k, v, q = make_messages(self.agents, h)
        with span("sample/comm/attention"):
            c, _ = targeted_attention(k, v, q)
        with span("sample/policy"):
            logits, _ = heads(self.agents, h, c)
            actions = torch.distributions.Categorical(logits=logits).sample().numpy()
        return actions, {}

    @torch.no_grad()
    def collect(self) -> Payload:
        return play_episodes(self.runner, self.episodes, self.cfg.max_cycles, self.act)


# --- Learner: N independent optimisers --------------------------------------------------


class TarMACLearner:
    def __init__(self, cfg: TarMACConfig) -> None:
        seed_everything(cfg.seed)
        self.cfg = cfg
        self.n, self.obs_dim, self.n_actions = env_dims(cfg.env, cfg.agents, cfg.max_cycles)
        self.agents = _agents(cfg, self.n, self.obs_dim, self.n_actions)
        self.opts = [torch.optim.Adam(a.parameters(), lr=cfg.lr) for a in self.agents]

    def weights(self) -> Weights:
        return {"agents": to_numpy_state(self.agents)}

    def update(self, payloads: list[Payload]) -> dict[str, float]:
        cfg, n = self.cfg, self.n
        with span("update/batch"):
            b = stack_payloads(payloads)
        obs, mask = b["obs"], b["mask"]  # [E, T, N, D], [E, T]

        with span("update/encode"):
            h = encode(self.agents, obs)
        with span("update/comm/signature"):
            k, v, q = make_messages(self.agents, h)
            if not cfg.backprop_messages:
                k, v = k.detach(), v.detach()
        with span("update/comm/attention"):
            c, weights = targeted_attention(k, v, q)
        with span("update/heads"):
            logits, values = heads(self.agents, h, c)

            with torch.no_grad():
                h_last = encode(self.agents, b["last_obs"])
                _, last_values = heads(self.agents, h_last, targeted_attention(*make_messages(self.agents, h_last))[0])

        with span("update/gae"):
            # Each agent's own reward and own critic: nothing is pooled across agents.
            adv, ret = episode_advantages(b["rew"] * cfg.reward_scale, values, b["done"], cfg.gamma, cfg.gae_lambda,
                                          b["terminal"], last_values)

        with span("update/backward"):
            losses, per_agent = [], []
            for i in range(n):
                loss_i, stats_i = a2c_loss(logits[..., i, :], b["act"][..., i], adv[..., i], values[..., i],
                                           ret[..., i], mask, cfg.value_coef, cfg.entropy_coef)
                losses.append(loss_i)
                per_agent.append(stats_i)
            for opt in self.opts:
                opt.zero_grad()
            # One backward of the sum = each loss's own backward, accumulated; agent i's
            # parameters get its own loss's gradient plus what receivers send back through
            # its messages.
            torch.stack(losses).sum().backward()

        with span("update/optim"):
            for agent, opt in zip(self.agents, self.opts, strict=True):
                # Clipped apart: the value loss's large early gradients must not shrink the policy's.
                nn.utils.clip_grad_norm_([p for name, p in agent.named_parameters()
                                          if not name.startswith("critic.")], cfg.grad_clip)
                nn.utils.clip_grad_norm_(agent.critic.parameters(), cfg.grad_clip)
                opt.step()

        stats = {key: float(np.mean([s[key] for s in per_agent])) for key in per_agent[0]}
        # How targeted the messages are: entropy of each receiver's attention (log(N-1) = uniform).
        if n > 1:
            ent = -(weights * weights.clamp(min=1e-9).log()).sum(-1)
            stats["comm/attention_entropy"] = ((ent * mask[..., None]).sum() / (mask.sum() * n)).item()
        return stats
