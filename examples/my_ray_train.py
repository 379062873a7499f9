"""A user's own Ray program, watched unmodified: `marlwatch run -- python examples/my_ray_train.py`.

Two actors step CartPole; the learner (this driver) makes a torch update on what they return.
marlwatch's auto phases find `sample/env_step` inside the actors and `update/...` here, because
a local `ray.init()` passes this process's environment (MARLWATCH_*, PYTHONPATH) to the actors.
On a cluster, pass it on yourself (docs/distributed.md):

    ray.init(address="auto", runtime_env={"env_vars": marlwatch.ray_env()})
"""

from __future__ import annotations

import sys

import gymnasium as gym
import numpy as np
import ray
import torch


@ray.remote(num_cpus=1)
class Sampler:
    def __init__(self, seed: int) -> None:
        self.env = gym.make("CartPole-v1")
        self.env.reset(seed=seed)

    def collect(self, weights: dict, steps: int) -> np.ndarray:
        policy = torch.nn.Linear(4, 2)
        policy.load_state_dict(weights)
        obs, _ = self.env.reset()
        out = np.zeros((steps, 4), np.float32)
        for i in range(steps):
            with torch.no_grad():
                action = int(policy(torch.as_tensor(obs)).argmax())
            obs, _, terminated, truncated, _ = self.env.step(action)
            out[i] = obs
            if terminated or truncated:
                obs, _ = self.env.reset()
        return out


def main(iterations: int) -> None:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    policy = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)
    actors = [Sampler.remote(seed) for seed in range(2)]
    for _ in range(iterations):
        weights = ray.put({k: v.detach() for k, v in policy.state_dict().items()})
        batches = ray.get([a.collect.remote(weights, 100) for a in actors])
        loss = policy(torch.as_tensor(np.concatenate(batches))).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
