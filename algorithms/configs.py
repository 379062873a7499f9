"""Every built-in algorithm's settings: what `--set key=value` can change, with defaults, and
what values each one takes.

They live apart from the algorithms' code because the monitor builds and validates a run's
config before it spawns the processes that train: importing this module costs no torch.

Each setting is declared with `setting(default, ...)`, which states the values that make sense
for it (a range, finite numbers, a choice); `BaseConfig.override` parses `--set` text against
it and `BaseConfig.check` refuses a config that breaks any rule, so a bad value fails with one
line before anything starts instead of crashing a learner later. A subclass that only changes a
default (`lr: float = 2e-3`) keeps its parent's rule.
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields
from typing import Any

TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")
KINDS: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


@dataclass(frozen=True)
class Rule:
    """The values a setting takes. Numbers are always finite; `above` excludes its bound."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    choices: tuple[str, ...] = ()
    flag: str = ""
    """Set by this command-line flag, not by `--set` (the run sizes its processes from the flag)."""

    def describe(self, kind: type) -> str:
        if kind is bool:
            return "true or false (yes/no, 1/0)"
        if self.choices:
            return " or ".join(self.choices)
        if kind is str:
            return "text"
        what = "a whole number" if kind is int else "a finite number"
        if self.at_least is not None and self.at_most is not None:
            return f"{what} from {_num(self.at_least)} to {_num(self.at_most)}"
        lo = f">= {_num(self.at_least)}" if self.at_least is not None else \
            f"> {_num(self.above)}" if self.above is not None else ""
        hi = f"<= {_num(self.at_most)}" if self.at_most is not None else ""
        return " ".join(filter(None, [what, lo, "and" if lo and hi else "", hi]))

    def parse(self, kind: type, text: str) -> Any:
        """`--set` text to a value of `kind`; ValueError if it is not one (range is `check`'s job)."""
        if kind is bool:
            if text.lower() in TRUE + FALSE:
                return text.lower() in TRUE
            raise ValueError(text)
        return kind(text)

    def ok(self, kind: type, value: Any) -> bool:
        if kind is bool or kind is str:
            return isinstance(value, kind) and (not self.choices or value in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
            return False
        if not math.isfinite(value):
            return False
        return ((self.at_least is None or value >= self.at_least) and (self.above is None or value > self.above)
                and (self.at_most is None or value <= self.at_most))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def setting(default: Any, *, at_least: float | None = None, above: float | None = None, at_most: float | None = None,
            choices: tuple[str, ...] = (), flag: str = "") -> Any:
    """A config field with the rule its values must follow (see `Rule`)."""
    return field(default=default, metadata={"rule": Rule(at_least, above, at_most, choices, flag)})


def _rule(cls: type, name: str) -> Rule | None:
    """The rule of the nearest class that declared this field with one: a subclass that only
    changes the default inherits it."""
    for klass in cls.__mro__:
        f: Field | None = vars(klass).get("__dataclass_fields__", {}).get(name)
        if f is not None and "rule" in f.metadata:
            return f.metadata["rule"]
    return None



F32 = 4  # bytes: every network, buffer and activation here is float32
TRAINING_COPIES = 5  # a trained parameter lives on as its gradient and Adam's two moments, and the
# target network's copy (MADDPG) or its share of the graph kept for backward (the others)
AUTOGRAD = 2  # an activation of a forward pass is kept for the backward pass, which makes its gradient


@dataclass(frozen=True)
class Footprint:
    """Memory a config makes a run's processes allocate, on top of each process's interpreter,
    torch and env (marlwatch.limits counts those). An estimate from the largest arrays, networks
    and activations only, so it errs low: it is for refusing runs that cannot fit, not for sizing."""

    learner: int
    """Bytes the learner allocates (networks and their training state, buffers, one update)."""
    worker: int
    """Bytes each worker allocates (its copy of the policy, one iteration's experience)."""
    biggest: str
    """What dominates, for the message ("the replay buffer")."""


def _mlp(n_in: int, hidden: int, n_out: int, layers: int = 2) -> int:
    """Parameters of mlp(n_in, n_out, (hidden,) * layers)."""
    return n_in * hidden + hidden + (layers - 1) * (hidden * hidden + hidden) + hidden * n_out + n_out


@dataclass
class BaseConfig:
    """Settings every algorithm has; each algorithm's config adds its hyperparameters."""

    env: str = setting("", flag="--env")
    """Environment name (see algorithms.envs); empty means the algorithm's default."""
    agents: int = setting(3, at_least=1, flag="--agents")
    """Number of agents."""
    workers: int = setting(1, at_least=1, flag="--workers")
    """Number of rollout worker processes (experience per iteration is split among them)."""
    seed: int = setting(0, at_least=0, at_most=2**32 - 1, flag="--seed")
    """Seed of random, numpy and torch in every process (worker i adds i); numpy takes 0..2^32-1."""

    def settings(self) -> dict[str, tuple[type, Rule]]:
        """Every setting of this config, by name: its type and its rule. A field of a user's
        config declared without `setting()` follows the plain rule of its type (a finite number,
        a boolean spelled as one)."""
        out = {}
        for f in fields(self):
            kind = KINDS.get(f.type) if isinstance(f.type, str) else f.type
            if kind in KINDS.values():
                out[f.name] = (kind, _rule(type(self), f.name) or Rule())
        return out

    def override(self, values: dict[str, str]) -> None:
        """Apply `--set key=value` overrides, parsed as each setting's type and checked against its rule."""
        known = self.settings()
        for key, raw in values.items():
            if key not in known:
                names = ", ".join(k for k, (_, r) in known.items() if not r.flag)
                raise ValueError(f"unknown setting {key!r} for this algorithm (settings: {names})")
            kind, rule = known[key]
            if rule.flag:
                raise ValueError(f"{key} is set with {rule.flag}, not --set")
            try:
                value = rule.parse(kind, raw)
            except ValueError:
                value = None
            if value is None or not rule.ok(kind, value):
                raise ValueError(f"--set {key}={raw}: {key} must be {rule.describe(kind)}")
            setattr(self, key, value)

    def check(self) -> None:
        """Refuse a config with any value outside its rule (set by a flag or by code), then the
        algorithm's own checks across settings (`validate`). ValueError with one line."""
        for name, (kind, rule) in self.settings().items():
            value = getattr(self, name)
            if not rule.ok(kind, value):
                raise ValueError(f"{rule.flag or name} must be {rule.describe(kind)}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """An algorithm's checks that involve several settings; raise ValueError."""

    def footprint(self, obs_dim: int, n_actions: int, iterations: int | None = None) -> Footprint:
        """The memory these settings need in a run of `iterations` (None: no end) (see Footprint);
        an algorithm that cannot say gives 0."""
        return Footprint(0, 0, "")


@dataclass
class ActorCriticConfig(BaseConfig):
    """Settings of the on-policy actor-critic algorithms (tom2c, tarmac, neurcomm)."""

    env: str = "simple_spread"
    max_cycles: int = setting(25, at_least=1)
    """Episode length."""
    episodes_per_iteration: int = setting(8, at_least=1)
    """Whole episodes played per iteration, split among the workers (each plays its share, rounded up)."""
    lr: float = setting(3e-3, above=0)
    """Adam learning rate."""
    gamma: float = setting(0.95, at_least=0, at_most=1)
    """Discount factor."""
    gae_lambda: float = setting(0.95, at_least=0, at_most=1)
    """GAE lambda."""
    entropy_coef: float = setting(0.01, at_least=0)
    """Entropy bonus."""
    value_coef: float = setting(0.5, at_least=0)
    """Weight of the value loss."""
    grad_clip: float = setting(1.0, above=0)
    """Gradient norm clip."""
    reward_scale: float = setting(0.1, above=0)
    """Rewards are multiplied by this for learning, so the critic's targets stay near 1 and its
    gradients do not drown the policy's."""

    def footprint(self, obs_dim: int, n_actions: int, iterations: int | None = None) -> Footprint:
        n, t = self.agents, self.max_cycles
        per_worker = -(-self.episodes_per_iteration // self.workers)
        step = n * (obs_dim + 3) * F32  # obs, the action (int64) and the reward of every agent
        params = self._params(obs_dim, n_actions) * F32
        update = per_worker * self.workers * t * (step + self._activations_per_step(obs_dim, n_actions) * F32 * AUTOGRAD)
        return Footprint(learner=params * TRAINING_COPIES + update, worker=params + per_worker * t * step,
                         biggest="one update's activations (episodes x steps x agents)")

    def _params(self, obs_dim: int, n_actions: int) -> int:
        """Parameters of every network the learner trains."""
        return 0

    def _activations_per_step(self, obs_dim: int, n_actions: int) -> int:
        """Floats the update computes for one step of one episode, over all agents."""
        return 0


@dataclass
class MADDPGConfig(BaseConfig):
    env: str = "simple_spread"
    lr: float = setting(1e-2, above=0)
    """Adam learning rate of actors and critics."""
    gamma: float = setting(0.95, at_least=0, at_most=1)
    """Discount factor."""
    batch_size: int = setting(1024, at_least=1)
    """Transitions per gradient step."""
    buffer_size: int = setting(1_000_000, at_least=1)
    """Replay buffer capacity (transitions)."""
    max_cycles: int = setting(25, at_least=1)
    """Episode length."""
    steps_per_iteration: int = setting(100, at_least=1)
    """Env steps collected per iteration over all workers: one update per 100 steps."""
    warmup: int = setting(2048, at_least=0)
    """Transitions stored before the first update. The original waits for 1024 x 25 = 25,600
    (`--set warmup=25600`: about 250 iterations, 25-30 s of a demo run with no update at all); two
    batches' worth lets the default run show updates and communication within seconds."""
    tau: float = setting(0.01, above=0, at_most=1)
    """Soft target update rate."""
    grad_clip: float = setting(0.5, above=0)
    """Gradient norm clip."""
    hidden: int = setting(64, at_least=1)
    """Width of the two hidden layers."""
    centralised_critic: bool = setting(True)
    """False turns MADDPG into independent DDPG learners (no communication)."""

    def footprint(self, obs_dim: int, n_actions: int, iterations: int | None = None) -> Footprint:
        n, d, a, h = self.agents, obs_dim, n_actions, self.hidden
        transition = (2 * n * d + n * a + n + 1) * F32  # obs, action, reward, next obs, done
        critic_in = n * (d + a) if self.centralised_critic else d + a
        actors, critics = n * _mlp(d, h, a) * F32, n * _mlp(critic_in, h, 1) * F32
        steps = -(-self.steps_per_iteration // self.workers)  # each worker's share, rounded up
        # The buffer's pages are touched as it fills: a run with an end stores at most its steps.
        stored = self.buffer_size if iterations is None else min(self.buffer_size, iterations * steps * self.workers)
        buffer = stored * transition
        # A sampled batch, and a critic's joint input (every agent's obs and target action).
        update = self.batch_size * (transition + critic_in * F32 * AUTOGRAD)
        biggest = max([(buffer, "the replay buffer (buffer_size x agents x observation)"),
                       (critics * TRAINING_COPIES, "the critics (agents x agents x observation inputs)"),
                       (update, "one update's joint critic inputs (batch_size x agents x observation)")])[1]
        return Footprint(learner=buffer + (actors + critics) * TRAINING_COPIES + update,
                         worker=actors + steps * transition, biggest=biggest)

    def validate(self) -> None:
        # A buffer never holds more than buffer_size transitions: a larger warm-up would never end
        # (the run would only collect), and a larger batch would resample the same few.
        for name in ("warmup", "batch_size"):
            if getattr(self, name) > self.buffer_size:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at most buffer_size ({self.buffer_size})")


@dataclass
class IndependentConfig(MADDPGConfig):
    centralised_critic: bool = False


@dataclass
class ToM2CConfig(ActorCriticConfig):
    hidden: int = setting(32, at_least=1)
    """Width of the encoder, GRU, ToM and graph networks."""
    tom_lr_scale: float = setting(10.0, above=0)
    """The ToM network's learning rate is lr times this."""
    tom_every: int = setting(5, at_least=1)
    """Train the ToM network every this many iterations."""
    gumbel_tau: float = setting(1.0, above=0)
    """Temperature of the edge Gumbel-softmax."""
    prop_steps: int = setting(2, at_least=0)
    """Propagation steps of the graph network (0: edges from the encodings alone)."""
    graph: str = setting("shared", choices=("shared", "per_agent"))
    """`shared`: one communication graph per step, inferred from every agent's memory (N x N edges).
    `per_agent`: as the original ToM2C, every agent infers the whole graph from its own beliefs
    and keeps its own row (N graphs of N x N edges: N^3), through the original's 2-layer
    propagators `graph_width` wide. docs/sweep-tom2c.md: which reproduces the study's growth."""
    graph_width: int = setting(192, at_least=1)
    """Width of the per_agent graph's MLPs; the original's is 3 x its node features (3 x (32 + 32)
    on cooperative navigation = 192)."""

    def _params(self, obs_dim: int, n_actions: int) -> int:
        n, h, g = self.agents, self.hidden, self.graph_width
        graph = ((2 * h + n) * h + 5 * h * h + 2 * h if self.graph == "shared"
                 else 3 * (h + n) * g + (self.prop_steps + 1) * (4 * g * g) + 3 * g * g)
        return (8 * h + 4 * h * h + 2 * h * h  # observation encoder, GRU
                + (2 * n + 2) * h + 6 * h * h + h * n  # ToM network
                + graph
                + _mlp(h + 2 * n, h, n_actions, 1) + obs_dim * h + 3 * h * h + _mlp(2 * h, h, 1, 1))  # actor, critic

    def _activations_per_step(self, obs_dim: int, n_actions: int) -> int:
        n, h = self.agents, self.hidden
        # The N x N pairs: ToM inputs (2N+2 each), goal guesses over N targets (logits and
        # probabilities), the ToM GRU's state, and the graph's edge features each round.
        pairs = n * n * ((2 * n + 2) + 2 * n + 4 * h + 2 * h * (self.prop_steps + 1)) + 6 * n * h
        if self.graph == "per_agent":  # N graphs of N x N edges: ~3 g-wide tensors kept per round
            pairs += n * n * n * self.graph_width * (2 + 3 * self.prop_steps)
        return pairs

    def validate(self) -> None:
        if self.env != "simple_spread":  # the encoder and ToM read simple_spread's observation layout
            raise ValueError(f"tom2c runs on simple_spread only, not {self.env} "
                             "(its encoder and ToM network read that observation layout)")
        if self.agents < 2:
            raise ValueError("tom2c needs at least 2 agents (each agent models the others)")


@dataclass
class TarMACConfig(ActorCriticConfig):
    hidden: int = setting(64, at_least=1)
    """Width of each agent's encoder, actor and critic."""
    key_dim: int = setting(16, at_least=1)
    """Size of message signatures and queries."""
    value_dim: int = setting(32, at_least=1)
    """Size of message values."""
    lr: float = 2e-3
    """Adam learning rate of every agent's optimiser (3e-3 let the per-agent policies collapse)."""
    backprop_messages: bool = setting(True)
    """Receivers' losses train the senders' message networks (DIAL-style); False detaches them."""

    def _params(self, obs_dim: int, n_actions: int) -> int:
        h, k, v = self.hidden, self.key_dim, self.value_dim
        per_agent = (_mlp(obs_dim, h, h, 1) + 2 * (h * k + k) + h * v + v
                     + _mlp(h + v, h, n_actions, 1) + _mlp(h + v, h, 1, 1))
        return self.agents * per_agent

    def _activations_per_step(self, obs_dim: int, n_actions: int) -> int:
        n = self.agents
        # N x N: in backward, each agent's slice of a batched tensor (its hidden state, its message,
        # its logits) gets a gradient as large as the whole tensor; the attention weights.
        return n * n * (self.hidden + self.value_dim + n_actions) // 2 + n * (6 * self.hidden + 2 * self.key_dim)


@dataclass
class NeurCommConfig(ActorCriticConfig):
    env: str = "cacc"
    max_cycles: int = 60
    """Episode length (the original CACC batch is one 60-step episode)."""
    episodes_per_iteration: int = 2
    """Whole episodes collected per iteration over all workers (split among them)."""
    hidden: int = setting(64, at_least=1)
    """Width of each encoder and of the LSTM, as in the original."""
    lr: float = 3e-3
    """Learning rate (tuned on cacc: the learning check trains for minutes, not hours)."""
    optimizer: str = setting("adam", choices=("adam", "rmsprop"))
    """`adam`, or `rmsprop` as in the original (lr 5e-4 there)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 1.0
    """GAE lambda; 1 gives the original's n-step returns (whole episodes here)."""
    alpha: float = setting(0.5, at_least=0, at_most=1)
    """Spatial discount: a neighbour d hops away weighs alpha^d in an agent's reward (0.9 learnt
    markedly slower on cacc in a few minutes: more of each agent's signal is others' noise)."""
    reward_scale: float = 0.01
    """Rewards are multiplied by this before learning (the original normalises CACC rewards too)."""
    grad_clip: float = 40.0
    """Gradient norm clip (the original's max_grad_norm)."""
    per_agent_loop: bool = setting(True)
    """Run agents one by one, as the original's Python loops do; False runs every agent in
    batched tensor ops (identical maths, far less per-agent overhead): compare the two profiles."""
    comm_account: str = setting("messages", choices=("messages", "layer"))
    """What is booked as communication. `messages`: the message exchange (gathering and encoding
    neighbours' observations, fingerprints and states; neighbours' actions for the critic).
    `layer`: the original's whole communication layer (lstm_comm_new: the exchange and the LSTM
    it feeds) and the backward pass through it, the study's reading. Only span names differ."""

    def _params(self, obs_dim: int, n_actions: int) -> int:
        h, k = self.hidden, 2  # a platoon: each vehicle's neighbours are the ones ahead and behind
        inputs = (k + 1) * obs_dim + k * n_actions + k * h  # own and neighbours' obs, fingerprints, states
        return self.agents * (inputs * h + 8 * h * h + 2 * h * (n_actions + 1))

    def _activations_per_step(self, obs_dim: int, n_actions: int) -> int:
        # Per agent: its LSTM's gates and states, its neighbours' inputs, and autograd's own records
        # of many small tensors; measured 24 KB per agent and step with batched ops, 50-65 KB in
        # the per-agent loop. 48 x hidden floats (x2 for backward) is the batched figure.
        return self.agents * 48 * self.hidden

    def validate(self) -> None:
        from algorithms.envs import make_env

        if not hasattr(make_env(self.env, self.agents, self.max_cycles), "neighbours"):
            raise ValueError(f"neurcomm needs an env with a neighbour graph (env.neighbours), such as cacc; "
                             f"{self.env} has none")
