"""MAPPO on PettingZoo MPE simple_spread with TorchRL, as TorchRL's multi-agent PPO tutorial
writes it: https://pytorch.org/rl/stable/tutorials/multiagent_ppo.html (the code-only version is
examples/multiagent/mappo_ippo.py in pytorch/rl).

Changed from the tutorial: the environment is PettingZoo's simple_spread (mpe2) through TorchRL's
PettingZooWrapper instead of VMAS navigation, so the done flag is per agent and needs no expanding;
TorchRL 0.14's names (Collector, actor_network/critic_network, low/high); tiny sizes, so a run
takes seconds; no tqdm, no plot. Nothing here imports marlwatch.
"""

import torch
from mpe2 import simple_spread_v3
from tensordict.nn import TensorDictModule
from tensordict.nn.distributions import NormalParamExtractor
from torchrl.collectors import Collector
from torchrl.data.replay_buffers import ReplayBuffer
from torchrl.data.replay_buffers.samplers import SamplerWithoutReplacement
from torchrl.data.replay_buffers.storages import LazyTensorStorage
from torchrl.envs import RewardSum, TransformedEnv
from torchrl.envs.libs.pettingzoo import PettingZooWrapper
from torchrl.envs.utils import MarlGroupMapType, check_env_specs
from torchrl.modules import MultiAgentMLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import ClipPPOLoss, ValueEstimators

torch.manual_seed(0)
torch.set_num_threads(1)
device = "cpu"

# Sampling
frames_per_batch = 200  # Number of team frames collected per training iteration
n_iters = 4  # Number of sampling and training iterations
total_frames = frames_per_batch * n_iters

# Training
num_epochs = 4  # Number of optimization steps per training iteration
minibatch_size = 50  # Size of the mini-batches in each optimization step
lr = 3e-4  # Learning rate
max_grad_norm = 1.0  # Maximum norm for the gradients

# PPO
clip_epsilon = 0.2  # clip value for PPO loss
gamma = 0.9  # discount factor
lmbda = 0.9  # lambda for generalized advantage estimation
entropy_eps = 1e-4  # coefficient of the entropy term in the PPO loss

# Environment: the lines that build it (PettingZoo instead of VMAS)
max_steps = 25
env = PettingZooWrapper(
    env=simple_spread_v3.parallel_env(N=3, max_cycles=max_steps, continuous_actions=True),
    group_map=MarlGroupMapType.ALL_IN_ONE_GROUP,  # one "agents" group, as in the tutorial
    device=device,
)
n_agents = len(env.group_map["agents"])

env = TransformedEnv(
    env,
    RewardSum(in_keys=[env.reward_key], out_keys=[("agents", "episode_reward")]),
)
check_env_specs(env)

# Policy
share_parameters_policy = True
policy_net = torch.nn.Sequential(
    MultiAgentMLP(
        n_agent_inputs=env.observation_spec["agents", "observation"].shape[-1],
        n_agent_outputs=2 * env.full_action_spec[env.action_key].shape[-1],
        n_agents=n_agents,
        centralised=False,
        share_params=share_parameters_policy,
        device=device,
        depth=2,
        num_cells=64,
        activation_class=torch.nn.Tanh,
    ),
    NormalParamExtractor(),
)
policy_module = TensorDictModule(
    policy_net,
    in_keys=[("agents", "observation")],
    out_keys=[("agents", "loc"), ("agents", "scale")],
)
policy = ProbabilisticActor(
    module=policy_module,
    spec=env.full_action_spec_unbatched,
    in_keys=[("agents", "loc"), ("agents", "scale")],
    out_keys=[env.action_key],
    distribution_class=TanhNormal,
    distribution_kwargs={
        "low": env.full_action_spec_unbatched[env.action_key].space.low,
        "high": env.full_action_spec_unbatched[env.action_key].space.high,
    },
    return_log_prob=True,
    log_prob_key=("agents", "sample_log_prob"),
)

# Critic (MAPPO: centralised, shared)
share_parameters_critic = True
mappo = True  # IPPO if False
critic_net = MultiAgentMLP(
    n_agent_inputs=env.observation_spec["agents", "observation"].shape[-1],
    n_agent_outputs=1,
    n_agents=n_agents,
    centralised=mappo,
    share_params=share_parameters_critic,
    device=device,
    depth=2,
    num_cells=64,
    activation_class=torch.nn.Tanh,
)
critic = TensorDictModule(
    module=critic_net,
    in_keys=[("agents", "observation")],
    out_keys=[("agents", "state_value")],
)

collector = Collector(
    env,
    policy,
    device=device,
    storing_device=device,
    frames_per_batch=frames_per_batch,
    total_frames=total_frames,
)

replay_buffer = ReplayBuffer(
    storage=LazyTensorStorage(frames_per_batch, device=device),
    sampler=SamplerWithoutReplacement(),
    batch_size=minibatch_size,
)

loss_module = ClipPPOLoss(
    actor_network=policy,
    critic_network=critic,
    clip_epsilon=clip_epsilon,
    entropy_coeff=entropy_eps,
    normalize_advantage=False,  # Important to avoid normalizing across the agent dimension
)
loss_module.set_keys(
    reward=env.reward_key,
    action=env.action_key,
    sample_log_prob=("agents", "sample_log_prob"),
    value=("agents", "state_value"),
    done=("agents", "done"),
    terminated=("agents", "terminated"),
)
loss_module.make_value_estimator(ValueEstimators.GAE, gamma=gamma, lmbda=lmbda)
GAE = loss_module.value_estimator

optim = torch.optim.Adam(loss_module.parameters(), lr)

# Training loop
for i, tensordict_data in enumerate(collector):
    with torch.no_grad():
        GAE(
            tensordict_data,
            params=loss_module.critic_network_params,
            target_params=loss_module.target_critic_network_params,
        )

    data_view = tensordict_data.reshape(-1)
    replay_buffer.extend(data_view)

    for _ in range(num_epochs):
        for _ in range(frames_per_batch // minibatch_size):
            subdata = replay_buffer.sample()
            loss_vals = loss_module(subdata)
            loss_value = loss_vals["loss_objective"] + loss_vals["loss_critic"] + loss_vals["loss_entropy"]
            loss_value.backward()
            torch.nn.utils.clip_grad_norm_(loss_module.parameters(), max_grad_norm)
            optim.step()
            optim.zero_grad()

    collector.update_policy_weights_()

    done = tensordict_data.get(("next", "agents", "done"))
    episode_reward_mean = tensordict_data.get(("next", "agents", "episode_reward"))[done].mean().item()
    print(f"iteration {i}: episode_reward_mean = {episode_reward_mean:.2f}", flush=True)

collector.shutdown()
