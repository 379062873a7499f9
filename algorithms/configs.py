"""Every built-in algorithm's settings: what `--set key=value` can change, with defaults.

They live apart from the algorithms' code because the monitor builds and validates a run's
config before it spawns the processes that train: importing this module costs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from algorithms.base import BaseConfig


@dataclass
class ActorCriticConfig(BaseConfig):
    """Settings of the on-policy actor-critic algorithms (tom2c, tarmac, neurcomm)."""

    env: str = "simple_spread"
    max_cycles: int = 25
    """Episode length."""
    episodes_per_iteration: int = 8
    """Whole episodes played per iteration, split among the workers (each plays its share, rounded up)."""
    lr: float = 3e-3
    """Adam learning rate."""
    gamma: float = 0.95
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    entropy_coef: float = 0.01
    """Entropy bonus."""
    value_coef: float = 0.5
    """Weight of the value loss."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    reward_scale: float = 0.1
    """Rewards are multiplied by this for learning, so the critic's targets stay near 1 and its
    gradients do not drown the policy's."""


@dataclass
class MADDPGConfig(BaseConfig):
    env: str = "simple_spread"
    lr: float = 1e-2
    """Adam learning rate of actors and critics."""
    gamma: float = 0.95
    """Discount factor."""
    batch_size: int = 1024
    """Transitions per gradient step."""
    buffer_size: int = 1_000_000
    """Replay buffer capacity (transitions)."""
    max_cycles: int = 25
    """Episode length."""
    steps_per_iteration: int = 100
    """Env steps collected per iteration over all workers: one update per 100 steps."""
    warmup: int = 1024 * 25
    """Transitions stored before the first update."""
    tau: float = 0.01
    """Soft target update rate."""
    grad_clip: float = 0.5
    """Gradient norm clip."""
    hidden: int = 64
    """Width of the two hidden layers."""
    centralised_critic: bool = True
    """False turns MADDPG into independent DDPG learners (no communication)."""


@dataclass
class IndependentConfig(MADDPGConfig):
    centralised_critic: bool = False


@dataclass
class ToM2CConfig(ActorCriticConfig):
    hidden: int = 32
    """Width of the encoder, GRU, ToM and graph networks."""
    tom_lr_scale: float = 10.0
    """The ToM network's learning rate is lr times this."""
    tom_every: int = 5
    """Train the ToM network every this many iterations."""
    gumbel_tau: float = 1.0
    """Temperature of the edge Gumbel-softmax."""
    prop_steps: int = 2
    """Propagation steps of the graph network."""

    def validate(self) -> None:
        if self.env != "simple_spread":  # the encoder and ToM read simple_spread's observation layout
            raise ValueError(f"tom2c runs on simple_spread only, not {self.env} "
                             "(its encoder and ToM network read that observation layout)")
        if self.agents < 2:
            raise ValueError("tom2c needs at least 2 agents (each agent models the others)")


@dataclass
class TarMACConfig(ActorCriticConfig):
    hidden: int = 64
    """Width of each agent's encoder, actor and critic."""
    key_dim: int = 16
    """Size of message signatures and queries."""
    value_dim: int = 32
    """Size of message values."""
    lr: float = 2e-3
    """Adam learning rate of every agent's optimiser (3e-3 let the per-agent policies collapse)."""
    backprop_messages: bool = True
    """Receivers' losses train the senders' message networks (DIAL-style); False detaches them."""


@dataclass
class NeurCommConfig(ActorCriticConfig):
    env: str = "cacc"
    max_cycles: int = 60
    """Episode length (the original CACC batch is one 60-step episode)."""
    episodes_per_iteration: int = 2
    """Whole episodes collected per iteration over all workers (split among them)."""
    hidden: int = 64
    """Width of each encoder and of the LSTM, as in the original."""
    lr: float = 3e-3
    """Learning rate (tuned on cacc: the learning check trains for minutes, not hours)."""
    optimizer: str = "adam"
    """`adam`, or `rmsprop` as in the original (lr 5e-4 there)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 1.0
    """GAE lambda; 1 gives the original's n-step returns (whole episodes here)."""
    alpha: float = 0.5
    """Spatial discount: a neighbour d hops away weighs alpha^d in an agent's reward (0.9 learnt
    markedly slower on cacc in a few minutes: more of each agent's signal is others' noise)."""
    reward_scale: float = 0.01
    """Rewards are multiplied by this before learning (the original normalises CACC rewards too)."""
    grad_clip: float = 40.0
    """Gradient norm clip (the original's max_grad_norm)."""
    per_agent_loop: bool = True
    """Run agents one by one, as the original's Python loops do; False runs every agent in
    batched tensor ops (identical maths, far less per-agent overhead): compare the two profiles."""

    def validate(self) -> None:
        from algorithms.envs import make_env

        if not hasattr(make_env(self.env, self.agents, self.max_cycles), "neighbours"):
            raise ValueError(f"neurcomm needs an env with a neighbour graph (env.neighbours), such as cacc; "
                             f"{self.env} has none")
        if self.optimizer not in ("adam", "rmsprop"):
            raise ValueError(f"neurcomm: optimizer must be adam or rmsprop, got {self.optimizer!r}")
