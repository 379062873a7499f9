"""NeurComm-style networked MARL (Chu, Chinchali, Katti 2020, "Multi-agent reinforcement
learning for networked system control"; public code cts198859/deeprl_network,
`agents/policies.py` NCMultiAgentPolicy).

Taxonomy: decentralised training, communication over a pre-defined graph. Every agent has its
own networks (no parameter sharing) and talks only to its graph neighbours (`env.neighbours`).
At each step agent i receives, from each neighbour j, a message made of j's observation, j's
policy fingerprint (its action probabilities at the previous step) and j's previous LSTM hidden
state. As in the original `_get_comm_s`, agent i encodes

    own + neighbours' observations      -> 64   (fc_x)
    neighbours' fingerprints            -> 64   (fc_p)
    neighbours' previous hidden states  -> 64   (fc_m)

concatenates the three, and feeds them to its LSTM(64); the actor reads the hidden state, the
critic reads the hidden state and the neighbours' actions. Each agent is trained by A2C on its
own spatially discounted reward r~_i = sum_j alpha^d(i,j) r_j (d: hops in the graph). Messages
are not detached in the update: the gradient flows back along the graph, as in the original,
which unrolls the whole network of agents through time.

marlwatch phases: while acting, `sample/comm/messages` (gathering neighbours' observations,
fingerprints and hidden states along the fixed neighbour table), `sample/comm/encode` (the
message encoders) and `sample/lstm` (the LSTM the messages feed); during the unrolled update the
same three as `update/...`, then the heads (`update/heads`, with `update/comm/actions`:
neighbours' actions for the critic), the loss, and a backward pass in two stages split where the
communication layer ends (its output, the hidden states): `update/backward` (heads) and
`update/layer_backward` (back through the LSTM, the encoders and the messages, over all steps),
then `update/optim`. The two stages give the same gradients as one backward pass.

What counts as communication is a setting, `comm_account` (docs/sweep-neurcomm.md):
`messages` (the default) counts the message exchange only: gathering and encoding neighbours'
observations, fingerprints and states, and neighbours' actions for the critic. `layer` counts, as
the study's reading of the original does, the original's whole communication layer
(`lstm_comm_new` in agents/utils.py: gathering, the three encoders and the LSTM they feed, run
agent by agent inside one function) and the backward pass through it: `lstm` and
`layer_backward` become `comm/lstm` and `comm/layer_backward`. Only span names differ.

Agents sit in one process; their per-agent weights are stacked ([N, in, out]). By default
(`per_agent_loop`) each step runs agent by agent, like the original's Python loops, so the
profile has the original's shape; `--set per_agent_loop=false` runs every agent's own layer in
one batched matmul instead: the same maths (the tests check both agree), a different profile.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Payload, Weights
from algorithms.common import (
    ParallelEnvRunner,
    a2c_loss,
    episode_advantages,
    load_numpy_state,
    play_episodes,
    seed_everything,
    stack_payloads,
    to_numpy_state,
    worker_runner,
    worker_share,
)
from algorithms.configs import NeurCommConfig
from algorithms.envs import make_env
from marlwatch import instrument

span = instrument.span


# --- Networks -------------------------------------------------------------------------------


class AgentLinear(nn.Module):
    """N independent linear layers applied at once: x [..., N, in] -> [..., N, out]."""

    def __init__(self, n: int, n_in: int, n_out: int) -> None:
        super().__init__()
        bound = 1.0 / np.sqrt(n_in)
        self.weight = nn.Parameter(torch.empty(n, n_in, n_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, n_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ni,nio->...no", x, self.weight) + self.bias

    def one(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Agent i's layer alone: x [..., in] -> [..., out]."""
        return x @ self.weight[i] + self.bias[i]


class AgentLSTMCell(nn.Module):
    """N independent LSTM cells: x [..., N, in], (h, c) [..., N, hidden]."""

    def __init__(self, n: int, n_in: int, hidden: int) -> None:
        super().__init__()
        self.ih = AgentLinear(n, n_in, 4 * hidden)
        self.hh = AgentLinear(n, hidden, 4 * hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cell(self.ih(x) + self.hh(h), c)

    def one(self, k: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Agent k's cell alone: x [..., in], (h, c) [..., hidden]."""
        return self._cell(self.ih.one(k, x) + self.hh.one(k, h), c)

    @staticmethod
    def _cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def neighbour_table(adjacency: np.ndarray) -> np.ndarray:
    """[N, K] indices of each agent's neighbours (K = largest degree), padded with N, which
    `gather` maps to a zero row: agent i can only ever read rows its table names."""
    n = adjacency.shape[0]
    lists = [np.flatnonzero(adjacency[i]) for i in range(n)]
    k = max(1, max(len(js) for js in lists))
    table = np.full((n, k), n, dtype=np.int64)
    for i, js in enumerate(lists):
        table[i, : len(js)] = js
    return table


def hop_distances(adjacency: np.ndarray) -> np.ndarray:
    """All-pairs hop counts of the graph (inf when unreachable), by breadth-first search."""
    n = adjacency.shape[0]
    dist = np.full((n, n), np.inf)
    for s in range(n):
        dist[s, s] = 0
        frontier = [s]
        while frontier:
            nxt = []
            for u in frontier:
                for v in np.flatnonzero(adjacency[u]):
                    if dist[s, v] == np.inf:
                        dist[s, v] = dist[s, u] + 1
                        nxt.append(v)
            frontier = nxt
    return dist


class NeurCommNet(nn.Module):
    """Every agent's NeurComm policy; `step` is one time step of the whole network of agents."""

    def __init__(self, adjacency: np.ndarray, obs_dim: int, n_actions: int, hidden: int = 64,
                 per_agent_loop: bool = True, comm_account: str = "messages") -> None:
        super().__init__()
        n = adjacency.shape[0]
        self.n, self.n_actions, self.hidden = n, n_actions, hidden
        self.per_agent_loop = per_agent_loop
        # Where the LSTM and the backward through the layer are booked (see the module's docstring).
        self.layer = "comm/" if comm_account == "layer" else ""
        self.register_buffer("table", torch.as_tensor(neighbour_table(adjacency)))
        k = self.table.shape[1]
        self.fc_x = AgentLinear(n, (k + 1) * obs_dim, hidden)
        self.fc_p = AgentLinear(n, k * n_actions, hidden)
        self.fc_m = AgentLinear(n, k * hidden, hidden)
        self.lstm = AgentLSTMCell(n, 3 * hidden, hidden)
        self.actor = AgentLinear(n, hidden, n_actions)
        self.critic = AgentLinear(n, hidden + k * n_actions, 1)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, F] -> [B, N, K*F]: row i holds what i's neighbours sent (zeros for padding)."""
        return self._padded(x)[:, self.table].flatten(2)

    @staticmethod
    def _padded(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)

    def gather_one(self, i: int, padded: torch.Tensor) -> torch.Tensor:
        """What agent i's neighbours sent: padded [B, N+1, F] -> [B, K*F]."""
        return padded[:, self.table[i]].flatten(1)

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, c, fingerprint) at an episode's start."""
        z = torch.zeros(batch, self.n, self.hidden)
        return z, z.clone(), torch.zeros(batch, self.n, self.n_actions)

    def step(self, obs: torch.Tensor, h: torch.Tensor, c: torch.Tensor, fp: torch.Tensor,
             phase: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """obs [B, N, D], h/c [B, N, H], fp [B, N, A] -> (logits [B, N, A], h, c). `phase` is
        `sample` or `update`: where the communication time is booked."""
        if self.per_agent_loop:
            return self._step_loop(obs, h, c, fp, phase)
        with span(f"{phase}/comm/messages"):
            n_obs, n_fp, n_h = self.gather(obs), self.gather(fp), self.gather(h)
        with span(f"{phase}/comm/encode"):
            s = torch.cat([F.relu(self.fc_x(torch.cat([obs, n_obs], dim=-1))),
                           F.relu(self.fc_p(n_fp)), F.relu(self.fc_m(n_h))], dim=-1)
        with span(f"{phase}/{self.layer}lstm"):
            h, c = self.lstm(s, h, c)
        return self.logits(h), h, c

    def _step_loop(self, obs: torch.Tensor, h: torch.Tensor, c: torch.Tensor, fp: torch.Tensor,
                   phase: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`step` agent by agent, as the original's `_get_comm_s` and `_run_lstm` loop: the same
        maths, but the cost of communication now grows with the number of agents in Python."""
        agents = range(self.n)
        with span(f"{phase}/comm/messages"):
            p_obs, p_fp, p_h = self._padded(obs), self._padded(fp), self._padded(h)
            msgs = [(self.gather_one(i, p_obs), self.gather_one(i, p_fp), self.gather_one(i, p_h)) for i in agents]
        with span(f"{phase}/comm/encode"):
            s = [torch.cat([F.relu(self.fc_x.one(i, torch.cat([obs[:, i], n_obs], dim=-1))),
                            F.relu(self.fc_p.one(i, n_fp)), F.relu(self.fc_m.one(i, n_h))], dim=-1)
                 for i, (n_obs, n_fp, n_h) in zip(agents, msgs, strict=True)]
        with span(f"{phase}/{self.layer}lstm"):
            hc = [self.lstm.one(i, s[i], h[:, i], c[:, i]) for i in agents]
            h, c = torch.stack([x[0] for x in hc], dim=1), torch.stack([x[1] for x in hc], dim=1)
        return self.logits(h), h, c

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Actor heads: h [..., N, H] -> logits [..., N, A] (agent by agent with `per_agent_loop`)."""
        if self.per_agent_loop:
            return torch.stack([self.actor.one(i, h[..., i, :]) for i in range(self.n)], dim=-2)
        return self.actor(h)

    def value(self, h: torch.Tensor, actions_onehot: torch.Tensor, phase: str) -> torch.Tensor:
        """Critic: own hidden state + neighbours' actions -> [B, N]."""
        if self.per_agent_loop:
            with span(f"{phase}/comm/actions"):
                padded = self._padded(actions_onehot)
                n_act = [self.gather_one(i, padded) for i in range(self.n)]
            return torch.stack([self.critic.one(i, torch.cat([h[:, i], n_act[i]], dim=-1)).squeeze(-1)
                                for i in range(self.n)], dim=1)
        with span(f"{phase}/comm/actions"):
            n_act = self.gather(actions_onehot)
        return self.critic(torch.cat([h, n_act], dim=-1)).squeeze(-1)


def _env(cfg: NeurCommConfig) -> object:
    env = make_env(cfg.env, cfg.agents, cfg.max_cycles)
    if not hasattr(env, "neighbours"):
        raise ValueError(f"neurcomm needs an env with a neighbour graph (env.neighbours); {cfg.env!r} has none")
    return env


def _net(cfg: NeurCommConfig, runner: ParallelEnvRunner) -> NeurCommNet:
    return NeurCommNet(np.asarray(runner.env.neighbours, dtype=bool), runner.obs_dim, runner.n_actions, cfg.hidden,
                       per_agent_loop=cfg.per_agent_loop, comm_account=cfg.comm_account)


# --- Worker: play whole episodes, messages flowing along the graph at every step -------------


class NeurCommRollout:
    def __init__(self, cfg: NeurCommConfig, worker_index: int) -> None:
        self.cfg = cfg
        self.runner = worker_runner(cfg, worker_index, _env(cfg))
        self.net = _net(cfg, self.runner)
        self.episodes = worker_share(cfg.episodes_per_iteration, cfg.workers)
        self.state = self.net.initial_state(1)

    def load_weights(self, weights: Weights) -> None:
        load_numpy_state(self.net, weights["net"])

    def act(self, obs: np.ndarray, t: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with span("sample/act"):
            if t == 0:
                self.state = self.net.initial_state(1)
            h, c, fp = self.state
            logits, h, c = self.net.step(torch.from_numpy(obs)[None], h, c, fp, "sample")
            probs = torch.softmax(logits, dim=-1)
            actions = torch.multinomial(probs[0], 1).squeeze(-1)
            self.state = (h, c, probs)
            return actions.numpy(), {}

    @torch.no_grad()
    def collect(self) -> Payload:
        return play_episodes(self.runner, self.episodes, self.cfg.max_cycles, self.act)


# --- Learner: unroll every episode through time, A2C on spatially discounted rewards --------


class NeurCommLearner:
    def __init__(self, cfg: NeurCommConfig) -> None:
        seed_everything(cfg.seed)
        self.cfg = cfg
        runner = ParallelEnvRunner(_env(cfg), seed=cfg.seed)
        self.n = runner.n
        self.net = _net(cfg, runner)
        dist = hop_distances(np.asarray(runner.env.neighbours, dtype=bool))
        # spatial[i, j] = alpha^d(i, j): how much agent j's reward counts for agent i.
        self.spatial = torch.as_tensor(np.where(np.isinf(dist), 0.0, cfg.alpha ** np.minimum(dist, 1e9)),
                                       dtype=torch.float32)
        if cfg.optimizer == "rmsprop":
            self.opt: torch.optim.Optimizer = torch.optim.RMSprop(self.net.parameters(), lr=cfg.lr, alpha=0.99,
                                                                  eps=1e-5)
        elif cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        else:
            raise ValueError(f"optimizer must be adam or rmsprop, got {cfg.optimizer!r}")

    def weights(self) -> Weights:
        return {"net": to_numpy_state(self.net)}

    def update(self, payloads: list[Payload]) -> dict[str, float]:
        cfg = self.cfg
        with span("update/batch"):
            # Episodes of every worker side by side, time first: [T, B, ...].
            b = {k: v.transpose(0, 1) for k, v in stack_payloads(payloads, ("obs", "act", "rew", "done", "mask")).items()}
            steps, batch = b["act"].shape[:2]
            actions_onehot = F.one_hot(b["act"], self.net.n_actions).float()
        net = self.net
        with span("update/unroll"):
            # The communication layer through time: messages, encoders, LSTM (the original's
            # lstm_comm_new). The actor's output here is only the next fingerprint (data).
            h, c, fp = net.initial_state(batch)
            hs = []
            for t in range(steps):
                lg, h, c = net.step(b["obs"][t], h, c, fp, "update")
                fp = torch.softmax(lg, dim=-1).detach()  # a fingerprint is data, not a gradient path
                hs.append(h)
            hs_t = torch.stack(hs)  # [T, B, N, H]: the layer's output
        with span("update/heads"):
            # The heads read a detached copy of the layer's output, so the backward pass splits
            # there into the heads' part and the layer's part (the same gradients as one pass).
            h_out = hs_t.detach().requires_grad_(True)
            logits_t = net.logits(h_out)
            values_t = net.value(h_out.flatten(0, 1), actions_onehot.flatten(0, 1), "update").reshape(steps, batch, -1)
        with span("update/gae"):
            with torch.no_grad():
                # An episode's last step ends it, also where the time limit cut it: no bootstrap,
                # as in the original (deeprl_network's A2C treats the horizon as terminal); CACC's
                # episodes are fixed-horizon platoon runs, not tasks that go on past the limit.
                rewards = (b["rew"] * cfg.reward_scale) @ self.spatial.T
                adv, ret = episode_advantages(rewards.transpose(0, 1), values_t.transpose(0, 1),
                                              b["done"].transpose(0, 1), cfg.gamma, cfg.gae_lambda)
                adv, ret = adv.transpose(0, 1), ret.transpose(0, 1)
        with span("update/loss"):
            loss, stats = a2c_loss(logits_t, b["act"], adv, values_t, ret, mask=b["mask"][..., None],
                                   value_coef=cfg.value_coef, entropy_coef=cfg.entropy_coef)
        self.opt.zero_grad()
        with span("update/backward"):
            loss.backward()  # the heads, down to the layer's output
        with span(f"update/{net.layer}layer_backward"):
            hs_t.backward(h_out.grad)  # through the LSTM, the encoders and the messages, all steps
        with span("update/optim"):
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            self.opt.step()
        return stats
