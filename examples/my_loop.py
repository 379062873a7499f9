"""A small MARL training loop of the kind marlwatch is for: three agents on PettingZoo's MPE
`simple_spread`, a shared policy whose agents exchange messages before acting, REINFORCE updates.

Run it plainly (`python examples/my_loop.py`), or watched: `marlwatch run -- python examples/my_loop.py`.
Nothing here calls marlwatch except the one span that marks the agents' message exchange as
communication: environment steps, backward passes and optimiser steps are found by marlwatch's
auto phases, and one iteration is one collect-then-update cycle (docs/your-training.md).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from mpe2 import simple_spread_v3
from torch import nn

import marlwatch


class CommPolicy(nn.Module):
    """Each agent encodes its observation, reads the mean of the others' encodings (its message),
    and picks one of the five discrete moves."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.encode = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh())
        self.act = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_actions))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # obs: [agents, obs_dim] -> logits
        h = self.encode(obs)
        with marlwatch.span("sample/comm/messages"):
            n = h.shape[0]
            messages = (h.sum(dim=0, keepdim=True) - h) / max(1, n - 1)
        return self.act(torch.cat([h, messages], dim=-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--episodes", type=int, default=4, help="episodes per update")
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    env = simple_spread_v3.parallel_env(N=args.agents, max_cycles=25, continuous_actions=False)
    agents = env.possible_agents
    obs_dim = env.observation_space(agents[0]).shape[0]
    policy = CommPolicy(obs_dim, env.action_space(agents[0]).n)
    optimiser = torch.optim.Adam(policy.parameters(), lr=3e-3)
    returns: list[float] = []
    for it in range(args.iterations):
        log_probs, rewards = [], []
        for e in range(args.episodes):
            obs, _ = env.reset(seed=args.seed * 100_000 + it * args.episodes + e)
            episode_rewards = []
            while env.agents:
                x = torch.as_tensor(np.stack([obs[a] for a in agents]), dtype=torch.float32)
                dist = torch.distributions.Categorical(logits=policy(x))
                actions = dist.sample()
                log_probs.append(dist.log_prob(actions).sum())
                obs, rew, _, _, _ = env.step({a: int(actions[i]) for i, a in enumerate(agents)})
                episode_rewards.append(sum(rew.values()))
            returns.append(sum(episode_rewards))
            # Reward-to-go for each step of this episode, as REINFORCE's return.
            rewards += list(np.cumsum(episode_rewards[::-1])[::-1])
        r = torch.as_tensor(np.array(rewards), dtype=torch.float32)
        loss = -(torch.stack(log_probs) * (r - r.mean()) / (r.std() + 1e-6)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if it % 50 == 0 or it == args.iterations - 1:
            print(f"iteration {it}: mean team return of the last 20 episodes {np.mean(returns[-20:]):.1f}", flush=True)


if __name__ == "__main__":
    main()
