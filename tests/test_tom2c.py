"""ToM2C-style: the ToM network sees every ordered pair, edges gate messages, real runs record
the communication phases; plus the shared on-policy pieces (GAE, attention) it is built on."""

from __future__ import annotations

import pytest
import torch

from algorithms import make_config
from algorithms.common import attention, bootstrap_truncated, compute_gae, discounted_returns
from algorithms.tom2c import (
    GraphNet,
    PerAgentGraphNet,
    ToM2CLearner,
    ToM2CRollout,
    ToMNet,
    aggregate_messages,
    final_goals,
    pair_inputs,
)
from tests.conftest import marlwatch, real_run


def _spread_obs(agents: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """simple_spread's observation layout built from absolute positions: [N, 6N]."""
    n = agents.shape[0]
    rows = []
    for i in range(n):
        others = [agents[j] - agents[i] for j in range(n) if j != i]
        rows.append(torch.cat([torch.zeros(2), agents[i], (landmarks - agents[i]).flatten(),
                               torch.cat(others), torch.zeros(2 * (n - 1))]))
    return torch.stack(rows)


def test_tom_input_has_every_pair_seen_from_the_observer() -> None:
    g = torch.Generator().manual_seed(0)
    n = 4
    agents, landmarks = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    pairs = pair_inputs(_spread_obs(agents, landmarks)[None], n)[0]
    assert pairs.shape == (n, n, 2 * n + 2)
    for i in range(n):
        for j in range(n):
            # landmarks relative to j, and j relative to i, computed from i's observation alone
            assert torch.allclose(pairs[i, j, : 2 * n], (landmarks - agents[j]).flatten(), atol=1e-6)
            assert torch.allclose(pairs[i, j, 2 * n :], agents[j] - agents[i], atol=1e-6)


def test_tom_network_runs_over_n_by_n_pairs() -> None:
    n, b, hidden = 3, 5, 8
    tom = ToMNet(n, hidden)
    seen: list[tuple[int, ...]] = []
    tom.gru.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    logits, h = tom(torch.randn(b, n, n, 2 * n + 2), torch.randn(b, n, hidden), torch.zeros(b, n, n, hidden))
    assert seen == [(b * n * n, 2 * hidden)]
    assert logits.shape == (b, n, n, n) and h.shape == (b, n, n, hidden)


def test_final_goals_are_the_landmark_each_agent_ends_nearest() -> None:
    landmarks = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    start = _spread_obs(torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 0.8]]), landmarks)
    end = _spread_obs(torch.tensor([[0.0, 0.9], [0.05, 0.0], [1.0, 0.1]]), landmarks)
    obs = torch.stack([start, end, start])[None]  # the third step is padding past the end
    assert final_goals(obs, torch.tensor([[1.0, 1.0, 0.0]]), 3).tolist() == [[2, 0, 1]]


def test_an_agent_with_no_incoming_edges_receives_nothing() -> None:
    g = torch.Generator().manual_seed(1)
    b, n = 2, 4
    goal_probs = torch.rand(b, n, n, n, generator=g).softmax(-1)
    edges = torch.ones(b, n, n) - torch.eye(n)
    edges[:, :, 2] = 0.0  # nobody sends to agent 2
    received = aggregate_messages(edges, goal_probs)
    assert received.shape == (b, n, 2 * n)
    assert torch.count_nonzero(received[:, 2]) == 0
    assert (received[:, [0, 1, 3]].abs().sum(-1) > 0).all()
    # A single edge 1 -> 3 delivers exactly (1's own goal, 1's guess of 3's goal).
    one = torch.zeros(b, n, n)
    one[:, 1, 3] = 1.0
    got = aggregate_messages(one, goal_probs)
    assert torch.allclose(got[:, 3], torch.cat([goal_probs[:, 1, 1], goal_probs[:, 1, 3]], -1))
    assert torch.count_nonzero(got[:, [0, 1, 2]]) == 0


@pytest.mark.parametrize("per_agent", [False, True])
def test_graph_edges_are_binary_without_self_loops_and_carry_gradient(per_agent: bool) -> None:
    torch.manual_seed(0)
    b, n, hidden = 3, 4, 8
    net = PerAgentGraphNet(n, hidden, width=16, steps=2) if per_agent else GraphNet(n, hidden, steps=2)
    h = torch.randn(b, n, hidden, requires_grad=True)
    tom_h = torch.randn(b, n, n, hidden, requires_grad=True)
    edges, logits = net(h, tom_h, torch.rand(b, n, n, n).softmax(-1), tau=1.0)
    assert edges.shape == (b, n, n) and logits.shape == (b, n, n, 2)
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.count_nonzero(torch.diagonal(edges, dim1=1, dim2=2)) == 0
    (edges * torch.randn(b, n, n)).sum().backward()  # straight-through: the policy can train the graph
    last = net.edge_predictor[-1] if per_agent else net.edge_out
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0


def test_per_agent_graph_row_i_is_what_agent_i_believes() -> None:
    """As in the original, agent i's edges come from its own graph: changing what agent 0
    believes of the others changes agent 0's outgoing edge logits only."""
    torch.manual_seed(0)
    b, n, hidden = 2, 4, 8
    net = PerAgentGraphNet(n, hidden, width=16, steps=2)
    tom_h, goals = torch.randn(b, n, n, hidden), torch.rand(b, n, n, n).softmax(-1)
    _, logits = net(torch.zeros(b, n, hidden), tom_h, goals, tau=1.0)
    tom_h2 = tom_h.clone()
    tom_h2[:, 0] += 1.0  # observer 0's beliefs about everyone
    _, logits2 = net(torch.zeros(b, n, hidden), tom_h2, goals, tau=1.0)
    assert not torch.allclose(logits[:, 0], logits2[:, 0])
    assert torch.equal(logits[:, 1:], logits2[:, 1:])


def test_attention_weights_sum_to_one() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 6, generator=g)
    out, w = attention(q, k, v)
    assert out.shape == (2, 3, 6) and torch.allclose(w.sum(-1), torch.ones(2, 3))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 1:] = False
    mask[2] = False  # nothing to attend to: zero weights, zero output
    out, w = attention(q, k, v, mask)
    assert torch.allclose(w[:, 0, 0], torch.ones(2)) and torch.allclose(w[:, 1].sum(-1), torch.ones(2))
    assert torch.count_nonzero(w[:, 2]) == 0 and torch.count_nonzero(out[:, 2]) == 0


def test_gae_matches_a_hand_computation() -> None:
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [1.0], [1.5]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    gamma, lam = 0.9, 0.8
    adv, ret = compute_gae(rewards, values, dones, torch.tensor([2.0]), gamma, lam)
    d2 = 3.0 + gamma * 2.0 - 1.5  # bootstraps from last_value
    d1 = 2.0 - 1.0  # episode ended at step 1: no bootstrap, and step 2 does not leak back
    d0 = 1.0 + gamma * 1.0 - 0.5
    assert torch.allclose(adv[:, 0], torch.tensor([d0 + gamma * lam * d1, d1, d2]))
    assert torch.allclose(ret, adv + values)
    # lambda = 1 with zero values is the discounted return
    adv1, _ = compute_gae(rewards, torch.zeros(3, 1), dones, torch.tensor([2.0]), gamma, 1.0)
    assert torch.allclose(adv1, discounted_returns(rewards, dones, torch.tensor([2.0]), gamma))



def test_a_time_limited_episode_bootstraps_from_its_last_observation() -> None:
    rewards = torch.ones(2, 3, 2)  # [episodes, T, agents]
    done = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # episode 1 ends early (padding after)
    terminal = torch.tensor([0.0, 1.0])  # the time limit cut episode 0; the task ended episode 1
    out = bootstrap_truncated(rewards, done, terminal, torch.tensor([[4.0, 6.0], [5.0, 5.0]]), 0.5)
    assert out[0, 2].tolist() == [3.0, 4.0]  # 1 + 0.5 * V(last_obs)
    assert torch.equal(out[0, :2], rewards[0, :2]) and torch.equal(out[1], rewards[1])


@pytest.mark.parametrize("graph", ["shared", "per_agent"])
def test_tom_trains_on_its_own_schedule_and_the_policy_every_iteration(graph: str) -> None:
    cfg = make_config("tom2c", agents=3, settings={"max_cycles": "5", "episodes_per_iteration": "2",
                                                    "tom_every": "3", "graph": graph, "graph_width": "16"})
    learner, rollout = ToM2CLearner(cfg), ToM2CRollout(cfg, 0)
    rollout.load_weights(learner.weights())
    payload = rollout.collect()
    assert payload["obs"].shape == (2, 5, 3, 18) and payload["mask"].all()
    tom_changed, actor_changed = [], []
    for _ in range(6):
        tom_before = learner.policy.tom.head.weight.detach().clone()
        actor_before = learner.policy.actor[0].weight.detach().clone()
        stats = learner.update([payload])
        assert all(isinstance(v, float) for v in stats.values())
        tom_changed.append(not torch.equal(tom_before, learner.policy.tom.head.weight))
        actor_changed.append(not torch.equal(actor_before, learner.policy.actor[0].weight))
    assert tom_changed == [True, False, False, True, False, False]  # the A2C loss never reaches it
    assert all(actor_changed)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("agents", [3])  # other agent counts: the unit tests above
def test_real_run_has_comm_phases(tmp_path, agents: int, no_leftovers) -> None:
    # ToM trains in iterations 0 and 2: iteration 0 is start-up, left out of the figures
    snap = real_run(tmp_path, "tom2c", agents, 3, "max_cycles=10", "episodes_per_iteration=1", "tom_every=2")
    names = {p.name for p in snap.phases}
    assert {"sample/comm/tom", "sample/comm/graph", "sample/comm/messages", "update/comm/tom",
            "update/comm/graph", "update/comm/messages", "update/comm/critic_attention",
            "update/comm/tom_train", "update/backward"} <= names
    assert snap.comm_share > 0 and snap.comm_share_update > 0
    assert len(snap.returns) == 3  # one 10-step episode per iteration


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "message"), [
    (["--env", "cacc"], "tom2c runs on simple_spread only, not cacc (its encoder and ToM network read that "
                        "observation layout)"),
    (["--agents", "1"], "tom2c needs at least 2 agents (each agent models the others)"),
])
def test_settings_it_cannot_run_are_refused_as_bad_input(tmp_path, args: list[str], message: str) -> None:
    proc = marlwatch("run", "--headless", "--algo", "tom2c", *args, "--iterations", "1",
                     "--record", str(tmp_path / "x.arrow"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"marlwatch: {message}"]
    assert not (tmp_path / "x.arrow").exists()
