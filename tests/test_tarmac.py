"""TarMAC-style: messages reach receivers only through targeted attention; per-agent learners
keep separate parameters; real runs record the communication phases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from algorithms import make_config
from algorithms.tarmac import TarMACLearner, encode, heads, make_messages, targeted_attention
from tests.conftest import real_run


def _kvq(b: int = 2, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3, generator=g), torch.randn(b, n, 5, generator=g), torch.randn(b, n, 3, generator=g)


def test_receivers_read_others_with_weights_summing_to_one() -> None:
    k, v, q = _kvq()
    c, w = targeted_attention(k, v, q)
    assert c.shape == (2, 4, 5) and w.shape == (2, 4, 4)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4))
    assert torch.count_nonzero(torch.diagonal(w, dim1=1, dim2=2)) == 0  # nobody reads itself
    assert torch.allclose(c, w @ v)


def test_a_senders_value_reaches_each_receiver_scaled_by_its_attention() -> None:
    k, v, q = _kvq(seed=1)
    c, w = targeted_attention(k, v, q)
    delta = torch.randn(2, 5)
    v2 = v.clone()
    v2[:, 1] += delta  # agent 1 says something else under the same signature
    c2, w2 = targeted_attention(k, v2, q)
    assert torch.equal(w, w2)
    for j in range(4):
        assert torch.allclose(c2[:, j] - c[:, j], w[:, j, 1, None] * delta, atol=1e-6)
    assert torch.allclose(c2[:, 1], c[:, 1])  # not even its own receiver slot changes


def test_a_sender_nobody_attends_to_changes_nothing() -> None:
    k, v, q = _kvq(seed=2)
    q = q.abs() + 0.1  # every query positive ...
    k = k.clone()
    k[:, 2] = -100.0  # ... so agent 2's signature scores hopeless with all of them
    c, w = targeted_attention(k, v, q)
    v2 = v.clone()
    v2[:, 2] += 100.0
    c2, _ = targeted_attention(k, v2, q)
    assert torch.all(w[:, [0, 1, 3], 2] < 1e-6)
    assert torch.allclose(c, c2, atol=1e-3)


def test_per_agent_learners_do_not_share_parameters_and_gradients_flow_through_messages() -> None:
    cfg = make_config("tarmac", agents=3)
    learner = TarMACLearner(cfg)
    agents = learner.agents
    ids = [{id(p) for p in a.parameters()} for a in agents]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and len(learner.opts) == 3
    obs = torch.randn(4, 3, learner.obs_dim)
    h = encode(agents, obs)
    k, v, q = make_messages(agents, h)
    c, _ = targeted_attention(k, v, q)
    logits, _ = heads(agents, h, c)
    logits[:, 0].sum().backward()  # agent 0's policy only
    # agent 0's loss reaches agent 1 through its message (signature and value), but agent 1's
    # own actor, critic and query are untouched.
    def grad(p: torch.Tensor) -> float:
        return 0.0 if p.grad is None else float(p.grad.abs().sum())

    assert grad(agents[1].value.weight) > 0 and grad(agents[1].signature.weight) > 0
    assert grad(agents[1].actor[0].weight) == 0 and grad(agents[1].query.weight) == 0
    assert grad(agents[0].actor[0].weight) > 0 and grad(agents[0].query.weight) > 0


def test_an_update_steps_every_agent_and_returns_float_gauges() -> None:
    cfg = make_config("tarmac", agents=2, settings={"max_cycles": "5"})
    learner = TarMACLearner(cfg)
    e, t, n, d = 2, 5, 2, learner.obs_dim
    rng = np.random.default_rng(0)
    payload = {"obs": rng.normal(size=(e, t, n, d)).astype(np.float32), "act": rng.integers(0, 5, (e, t, n)),
               "rew": rng.normal(size=(e, t, n)).astype(np.float32), "done": np.zeros((e, t), np.float32),
               "mask": np.ones((e, t), np.float32), "terminal": np.zeros((e,), np.float32),
               "last_obs": rng.normal(size=(e, n, d)).astype(np.float32)}
    payload["done"][:, -1] = 1.0
    before = [a.actor[0].weight.detach().clone() for a in learner.agents]
    stats = learner.update([payload])
    assert all(isinstance(v, float) for v in stats.values()) and "loss/policy" in stats
    assert all(not torch.equal(b, a.actor[0].weight) for b, a in zip(before, learner.agents, strict=True))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("agents", [3])  # other agent counts: the unit tests above
def test_real_run_has_comm_phases(tmp_path, agents: int, no_leftovers) -> None:
    snap = real_run(tmp_path, "tarmac", agents, 3, "max_cycles=10", "episodes_per_iteration=1")
    names = {p.name for p in snap.phases}
    assert {"sample/comm/signature", "sample/comm/attention", "update/comm/signature",
            "update/comm/attention", "update/backward", "update/optim"} <= names
    assert snap.comm_share > 0 and snap.comm_share_update > 0
    assert len(snap.returns) == 3
