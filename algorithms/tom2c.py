"""ToM2C-style learned communication (after Wang et al. 2022, "ToM2C: Target-oriented
Multi-agent Communication and Cooperation with Theory of Mind"), on cooperative navigation.

Taxonomy: CTDE + learned communication. Every agent runs the same (shared) networks:

1. observation encoder: its own state attends over entity tokens (landmarks, other agents),
   then a GRU (32) keeps a memory across steps;
2. theory of mind (ToM): for every ordered pair (i, j), N x N pairs, a GRU infers which
   landmark agent j is heading for, from j's position and the landmarks as agent i sees them
   (so its input is B x N x N pairs of 2N+2 numbers: cost grows as N^3);
3. graph network: decides whom each agent messages. Edge MLPs over the N x N pairs (both
   agents' memories + i's inferred goal of j), two propagation steps, then a hard
   Gumbel-softmax per edge (on/off, straight-through so the policy gradient trains it).
   `graph=per_agent` is the original's shape instead (`Graph_Infer`/`PropNet` run on
   `batch * num_agents` graphs): every agent infers the whole N x N graph from its own beliefs
   (its ToM memories and goal guesses of the others) through 2-layer propagators `graph_width`
   (192) wide, and keeps its own row: B x N^3 edge evaluations, the term that grows ~8x per
   doubling of agents (docs/sweep-tom2c.md);
4. messages: sender i tells receiver j "where I think I am going and where I think you are
   going" (i's ToM outputs for (i, i) and (i, j)); each receiver sums what its on-edges bring,
   and its policy reads that sum next to its memory;
5. critic: each agent's value attends over all agents' observations (centralised, training only).

Training: A2C with GAE on whole episodes; the ToM network has its own optimiser (10x the
learning rate) and is trained every `tom_every` iterations on a cross-entropy loss.

Goal used to train ToM (simple_spread has no assigned targets, unlike ToM2C's MSMTC): the
landmark nearest to agent j at the last step of the episode, i.e. the landmark j ended up
covering. Landmark indices are global (every agent sees the landmarks in the same order).

Phases: acting `sample/encode`, `sample/comm/tom`, `sample/comm/graph`, `sample/comm/messages`,
`sample/policy`; training `update/batch`, `update/encode`, `update/comm/tom`, `update/comm/graph`,
`update/comm/messages`, `update/policy`, `update/comm/critic_attention`, `update/gae`,
`update/backward`, `update/optim`, `update/comm/tom_train`. Episodes cut by the time limit bootstrap from the
value of their last observation (the observation carries no clock). Simplification: no
communication penalty on edges. Observed: on simple_spread the graph often learns to switch
most edges off within a few hundred iterations (gauge `comm/edges_on`); every edge is still
evaluated each step, so the time profile does not change with it.
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
    gumbel_softmax,
    load_numpy_state,
    mlp,
    play_episodes,
    seed_everything,
    stack_payloads,
    to_numpy_state,
    worker_runner,
    worker_share,
)
from algorithms.configs import ToM2CConfig
from marlwatch import instrument

span = instrument.span


# --- Observation layout of simple_spread ------------------------------------------------
# [vel(2), pos(2), landmarks rel. to me (2N), other agents rel. to me (2(N-1)), comm (2(N-1))]


def split_obs(obs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """obs [..., D] -> (self token [..., 4], entity tokens [..., 2N-1, 4]: dx, dy, is_landmark, is_agent)."""
    lead = obs.shape[:-1]
    lm = obs[..., 4 : 4 + 2 * n].reshape(*lead, n, 2)
    ag = obs[..., 4 + 2 * n : 4 * n + 2].reshape(*lead, n - 1, 2)
    lm = torch.cat([lm, torch.ones_like(lm[..., :1]), torch.zeros_like(lm[..., :1])], -1)
    ag = torch.cat([ag, torch.zeros_like(ag[..., :1]), torch.ones_like(ag[..., :1])], -1)
    return obs[..., :4], torch.cat([lm, ag], dim=-2)


def pair_inputs(obs: torch.Tensor, n: int) -> torch.Tensor:
    """All agents' obs [..., N, D] -> ToM inputs [..., N, N, 2N+2]: for observer i and target j,
    the landmarks relative to j and j's position, both as i sees them ((i, i) is i itself)."""
    lead = obs.shape[:-2]
    lm = obs[..., 4 : 4 + 2 * n].reshape(*lead, n, n, 2)  # [.., observer, landmark, 2]
    others = obs[..., 4 + 2 * n : 4 * n + 2].reshape(*lead, n, n - 1, 2)
    others = torch.cat([others, torch.zeros_like(others[..., :1, :])], dim=-2)  # slot n-1: "myself" = 0
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    slot = torch.where(i == j, n - 1, j - (j > i).long())  # where j sits in i's list of others
    pos = others[..., i, slot, :]  # [.., i, j, 2]
    lm_from_j = lm[..., :, None, :, :] - pos[..., :, :, None, :]  # [.., i, j, landmark, 2]
    return torch.cat([lm_from_j.flatten(-2), pos], dim=-1)


def final_goals(obs: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """obs [E, T, N, D], mask [E, T] -> landmark nearest to each agent at its episode's last step [E, N]."""
    last = (mask.sum(1).long() - 1).clamp(min=0)
    final = obs[torch.arange(obs.shape[0]), last]  # [E, N, D]
    lm = final[..., 4 : 4 + 2 * n].reshape(*final.shape[:-1], n, 2)
    return lm.norm(dim=-1).argmin(-1)


# --- Networks ---------------------------------------------------------------------------


class ObsEncoder(nn.Module):
    """Own state attends over entity tokens; the result is the GRU's input."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.self_fc = nn.Linear(4, hidden)
        self.ent_fc = nn.Linear(4, hidden)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.out = nn.Linear(2 * hidden, hidden)

    def forward(self, obs: torch.Tensor, n: int) -> torch.Tensor:
        me, ents = split_obs(obs, n)
        s = F.relu(self.self_fc(me))
        e = F.relu(self.ent_fc(ents))
        ctx, _ = attention(self.query(s).unsqueeze(-2), self.key(e), e)
        return F.relu(self.out(torch.cat([s, ctx.squeeze(-2)], dim=-1)))


class ToMNet(nn.Module):
    """Per ordered pair (i, j): a GRU over time inferring j's goal landmark from i's view."""

    def __init__(self, n: int, hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(2 * n + 2, hidden)
        self.gru = nn.GRUCell(2 * hidden, hidden)
        self.head = nn.Linear(hidden, n)

    def forward(self, pairs: torch.Tensor, h_agents: torch.Tensor, tom_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pairs [B, N, N, 2N+2], h_agents [B, N, H] (observers' memories), tom_h [B, N, N, H]
        -> (goal logits [B, N, N, N landmarks], new tom_h)."""
        b, n = pairs.shape[:2]
        x = torch.cat([F.relu(self.inp(pairs)), h_agents[:, :, None, :].expand(b, n, n, -1)], dim=-1)
        new_h = self.gru(x.reshape(b * n * n, -1), tom_h.reshape(b * n * n, -1)).reshape(b, n, n, -1)
        return self.head(new_h), new_h


class GraphNet(nn.Module):
    """Whom to message: edge MLPs over all N x N pairs, `steps` propagation rounds, then a
    hard Gumbel-softmax per edge. edges[b, i, j] = 1 means i sends to j; no self edges."""

    def __init__(self, n: int, hidden: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.edge_in = mlp(2 * hidden + n, hidden, (hidden,))
        self.node_update = nn.Linear(2 * hidden, hidden)
        self.edge_update = nn.Linear(3 * hidden, hidden)
        self.edge_out = nn.Linear(hidden, 2)

    def forward(self, h: torch.Tensor, tom_h: torch.Tensor, goal_probs: torch.Tensor,
                tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, N, H], goal_probs [B, N, N, N] -> (edges [B, N, N] in {0, 1}, edge logits [B, N, N, 2]).
        (`tom_h` is what PerAgentGraphNet reads; one graph shared by all agents does not.)"""
        b, n, hd = h.shape
        hi = h[:, :, None, :].expand(b, n, n, hd)
        hj = h[:, None, :, :].expand(b, n, n, hd)
        e = F.relu(self.edge_in(torch.cat([hi, hj, goal_probs], dim=-1)))
        node = h
        for _ in range(self.steps):
            node = F.relu(self.node_update(torch.cat([node, e.sum(dim=1)], dim=-1)))  # incoming edges
            ni = node[:, :, None, :].expand(b, n, n, hd)
            nj = node[:, None, :, :].expand(b, n, n, hd)
            e = F.relu(self.edge_update(torch.cat([ni, nj, e], dim=-1)))
        logits = self.edge_out(e)
        edges = gumbel_softmax(logits, temperature=tau, hard=True)[..., 1]
        return edges * (1.0 - torch.eye(n)), logits


class PerAgentGraphNet(nn.Module):
    """The original's graph inference (ToM2C `Graph_Infer`/`PropNet`): every agent infers the whole
    communication graph from its own view, and keeps its own row. So there are B x N graphs of N
    nodes (B x N^3 edges), and each edge goes through MLPs `width` wide (the original: 3 x its node
    features). Node j in agent i's graph is what i believes of j: i's ToM memory of j and i's guess
    of j's goal. Propagation as PropNet: an edge encoder, `steps` rounds of 2-layer edge and node
    propagators, a 2-layer edge predictor over (edge effect, edge encoding)."""

    def __init__(self, n: int, hidden: int, width: int, steps: int) -> None:
        super().__init__()
        d, g = hidden + n, width
        self.node_encoder = nn.Linear(d, g)
        self.edge_encoder = nn.Linear(2 * d, g)
        self.edge_propagators = nn.ModuleList(mlp(3 * g, g, (g,)) for _ in range(steps))
        self.node_propagator = mlp(3 * g, g, (g,))
        self.edge_predictor = mlp(2 * g, 2, (g,))

    def forward(self, h: torch.Tensor, tom_h: torch.Tensor, goal_probs: torch.Tensor,
                tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """tom_h [B, N, N, H] (i's memory of j), goal_probs [B, N, N, N] -> (edges [B, N, N], logits [B, N, N, 2])."""
        b, n = tom_h.shape[:2]
        x = torch.cat([tom_h, goal_probs], dim=-1).reshape(b * n, n, -1)  # B*N graphs, one per observer
        node_enc = F.relu(self.node_encoder(x))
        edge_enc = F.relu(self.edge_encoder(torch.cat(_pairs(x), dim=-1)))  # [B*N, N, N, g]
        node, edge = node_enc, edge_enc
        for propagate in self.edge_propagators:
            edge = F.relu(propagate(torch.cat([*_pairs(node), edge], dim=-1)))
            node = F.relu(self.node_propagator(torch.cat([node_enc, node, edge.sum(dim=2)], dim=-1)))
        logits = self.edge_predictor(torch.cat([edge, edge_enc], dim=-1)).reshape(b, n, n, n, 2)
        own = logits[:, torch.arange(n), torch.arange(n)]  # observer i keeps its own row: i -> j
        edges = gumbel_softmax(own, temperature=tau, hard=True)[..., 1]
        return edges * (1.0 - torch.eye(n)), own


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [G, N, F] -> (x_i, x_j) [G, N, N, F] each: every ordered pair of a graph's nodes."""
    g, n, f = x.shape
    return x[:, :, None, :].expand(g, n, n, f), x[:, None, :, :].expand(g, n, n, f)


def aggregate_messages(edges: torch.Tensor, goal_probs: torch.Tensor) -> torch.Tensor:
    """edges [B, N, N] (sender, receiver), goal_probs [B, N, N, N] -> received [B, N, 2N]:
    receiver j gets the sum over senders i with an on-edge of (i's own goal, i's guess of j's goal)."""
    n = edges.shape[-1]
    own = torch.diagonal(goal_probs, dim1=1, dim2=2).transpose(1, 2)  # [B, sender, N]
    content = torch.cat([own[:, :, None, :].expand(-1, n, n, -1), goal_probs], dim=-1)  # [B, i, j, 2N]
    return (edges[..., None] * content).sum(dim=1)


class Policy(nn.Module):
    """Everything an agent runs when acting (shared by all agents)."""

    def __init__(self, n: int, n_actions: int, cfg: ToM2CConfig) -> None:
        super().__init__()
        hidden = cfg.hidden
        self.encoder = ObsEncoder(hidden)
        self.gru = nn.GRUCell(hidden, hidden)
        self.tom = ToMNet(n, hidden)
        self.graph: nn.Module = (PerAgentGraphNet(n, hidden, cfg.graph_width, cfg.prop_steps) if cfg.graph == "per_agent"
                                 else GraphNet(n, hidden, cfg.prop_steps))
        self.actor = mlp(hidden + 2 * n, n_actions, (hidden,))


class AttentionCritic(nn.Module):
    """V_i from agent i's observation attending over every agent's observation."""

    def __init__(self, obs_dim: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Linear(obs_dim, hidden)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.head = mlp(2 * hidden, 1, (hidden,))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs [..., N, D] -> values [..., N]."""
        e = F.relu(self.embed(obs))
        ctx, _ = attention(self.query(e), self.key(e), self.value(e))
        return self.head(torch.cat([e, ctx], dim=-1)).squeeze(-1)


# --- Worker: plays whole episodes -------------------------------------------------------


class ToM2CRollout:
    def __init__(self, cfg: ToM2CConfig, worker_index: int) -> None:
        self.cfg = cfg
        self.runner = worker_runner(cfg, worker_index)
        self.episodes = worker_share(cfg.episodes_per_iteration, cfg.workers)
        self.n = n = self.runner.n
        check_obs(self.runner.obs_dim, n)
        self.policy = Policy(n, self.runner.n_actions, cfg)
        self.h = torch.zeros(1, n, cfg.hidden)
        self.tom_h = torch.zeros(1, n, n, cfg.hidden)

    def load_weights(self, weights: Weights) -> None:
        load_numpy_state(self.policy, weights["policy"])

    def act(self, obs_np: np.ndarray, t: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        p, n = self.policy, self.n
        if t == 0:
            self.h.zero_()
            self.tom_h.zero_()
        obs = torch.from_numpy(obs_np)[None]  # [1, N, D]
        with span("sample/encode"):
            self.h = p.gru(p.encoder(obs, n).reshape(n, -1), self.h.reshape(n, -1)).reshape(1, n, -1)
        with span("sample/comm/tom"):
            goal_logits, self.tom_h = p.tom(pair_inputs(obs, n), self.h, self.tom_h)
            goal_probs = goal_logits.softmax(-1)
        with span("sample/comm/graph"):
            edges, _ = p.graph(self.h, self.tom_h, goal_probs, self.cfg.gumbel_tau)
        with span("sample/comm/messages"):
            received = aggregate_messages(edges, goal_probs)
        with span("sample/policy"):
            logits = p.actor(torch.cat([self.h, received], dim=-1))[0]
            actions = torch.distributions.Categorical(logits=logits).sample().numpy()
        return actions, {}

    @torch.no_grad()
    def collect(self) -> Payload:
        return play_episodes(self.runner, self.episodes, self.cfg.max_cycles, self.act)


def check_obs(obs_dim: int, n: int) -> None:
    if obs_dim != 6 * n:
        raise ValueError(f"tom2c reads simple_spread observations (6N = {6 * n} numbers), got {obs_dim}")


# --- Learner ----------------------------------------------------------------------------


class ToM2CLearner:
    def __init__(self, cfg: ToM2CConfig) -> None:
        seed_everything(cfg.seed)
        self.cfg = cfg
        self.n, self.obs_dim, self.n_actions = env_dims(cfg.env, cfg.agents, cfg.max_cycles)
        check_obs(self.obs_dim, self.n)
        self.policy = Policy(self.n, self.n_actions, cfg)
        self.critic = AttentionCritic(self.obs_dim, cfg.hidden)
        # The ToM network has its own optimiser and schedule; the A2C loss never reaches it.
        tom_params = set(self.policy.tom.parameters())
        self.actor_params = [p for p in self.policy.parameters() if p not in tom_params]
        self.opt = torch.optim.Adam(self.actor_params + list(self.critic.parameters()), lr=cfg.lr)
        self.tom_opt = torch.optim.Adam(self.policy.tom.parameters(), lr=cfg.lr * cfg.tom_lr_scale)
        self.iteration = 0
        self.tom_loss = self.tom_acc = 0.0

    def weights(self) -> Weights:
        return {"policy": to_numpy_state(self.policy)}

    def update(self, payloads: list[Payload]) -> dict[str, float]:
        cfg, p, n = self.cfg, self.policy, self.n
        with span("update/batch"):
            b = stack_payloads(payloads)
        obs, mask = b["obs"], b["mask"]  # [E, T, N, D], [E, T]
        e_count, steps = mask.shape
        train_tom = self.iteration % cfg.tom_every == 0
        self.iteration += 1

        with span("update/encode"):
            feat = p.encoder(obs, n)  # [E, T, N, H]
            h = torch.zeros(e_count * n, cfg.hidden)
            hs = []
            for t in range(steps):
                h = p.gru(feat[:, t].reshape(e_count * n, -1), h)
                hs.append(h.reshape(e_count, n, -1))
            hseq = torch.stack(hs, dim=1)  # [E, T, N, H]

        with span("update/comm/tom"), torch.set_grad_enabled(train_tom):
            pairs = pair_inputs(obs, n)  # [E, T, N, N, 2N+2]
            tom_h = torch.zeros(e_count, n, n, cfg.hidden)
            goal_logits, tom_hs = [], []
            for t in range(steps):
                logit, tom_h = p.tom(pairs[:, t], hseq[:, t].detach(), tom_h)
                goal_logits.append(logit)
                tom_hs.append(tom_h.detach())  # the graph reads beliefs; it does not train them
            goal_logits_t = torch.stack(goal_logits, dim=1)  # [E, T, N, N, N]
            goal_probs = goal_logits_t.detach().softmax(-1).reshape(e_count * steps, n, n, n)
            flat_tom_h = torch.stack(tom_hs, dim=1).reshape(e_count * steps, n, n, -1)

        with span("update/comm/graph"):
            flat_h = hseq.reshape(e_count * steps, n, -1)
            edges, _ = p.graph(flat_h, flat_tom_h, goal_probs, cfg.gumbel_tau)

        with span("update/comm/messages"):
            received = aggregate_messages(edges, goal_probs)

        with span("update/policy"):
            logits = p.actor(torch.cat([flat_h, received], dim=-1)).reshape(e_count, steps, n, -1)

        with span("update/comm/critic_attention"):
            values = self.critic(obs)  # [E, T, N]
            with torch.no_grad():
                last_values = self.critic(b["last_obs"])  # [E, N]

        with span("update/gae"):
            adv, ret = episode_advantages(b["rew"] * cfg.reward_scale, values, b["done"], cfg.gamma, cfg.gae_lambda,
                                          b["terminal"], last_values)

        with span("update/backward"):
            loss, stats = a2c_loss(logits, b["act"], adv, values, ret, mask[..., None],
                                   cfg.value_coef, cfg.entropy_coef)
            self.opt.zero_grad()
            loss.backward()

        with span("update/optim"):
            # Clipped apart: the value loss's large early gradients must not shrink the policy's.
            nn.utils.clip_grad_norm_(self.actor_params, cfg.grad_clip)
            nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.grad_clip)
            self.opt.step()

        if train_tom:
            with span("update/comm/tom_train"):
                goals = final_goals(obs, mask, n)  # [E, N]: what each agent j ended up covering
                target = goals[:, None, None, :].expand(e_count, steps, n, n)  # observer i, target j
                ce = F.cross_entropy(goal_logits_t.reshape(-1, n), target.reshape(-1), reduction="none")
                tom_loss = (ce.reshape(e_count, steps, n * n) * mask[..., None]).sum() / (mask.sum() * n * n)
                self.tom_opt.zero_grad()
                tom_loss.backward()
                nn.utils.clip_grad_norm_(p.tom.parameters(), cfg.grad_clip)
                self.tom_opt.step()
                self.tom_loss = tom_loss.item()
                self.tom_acc = (goal_logits_t.argmax(-1) == target).float().mean().item()
        stats["loss/tom"], stats["tom/accuracy"] = self.tom_loss, self.tom_acc
        stats["comm/edges_on"] = edges.sum().item() / max(1, edges.shape[0] * n * (n - 1))
        return stats
