"""NeurComm: messages only flow along the neighbour graph; real runs record the comm phases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from algorithms.neurcomm import NeurCommNet, hop_distances, neighbour_table
from tests.conftest import marlwatch, real_run

LINE4 = np.abs(np.arange(4)[:, None] - np.arange(4)[None, :]) == 1


def _net(adjacency: np.ndarray = LINE4, loop: bool = True) -> NeurCommNet:
    torch.manual_seed(0)
    return NeurCommNet(adjacency, obs_dim=5, n_actions=3, hidden=8, per_agent_loop=loop)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 8, generator=g),
            torch.randn(2, 4, 8, generator=g), torch.rand(2, 4, 3, generator=g))


def test_neighbour_table_and_distances() -> None:
    assert neighbour_table(LINE4).tolist() == [[1, 4], [0, 2], [1, 3], [2, 4]]  # 4 = padding
    assert hop_distances(LINE4)[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("loop", [True, False])
@pytest.mark.parametrize("field", [0, 1, 3])  # observation, hidden state, fingerprint
def test_a_non_neighbours_state_does_not_reach_an_agent(field: int, loop: bool) -> None:
    net = _net(loop=loop)
    inputs = list(_inputs())
    with torch.no_grad():
        logits, h, _ = net.step(*inputs, phase="update")
        inputs[field] = inputs[field].clone()
        inputs[field][:, 3] += 5.0  # agent 3 changes; only agents 2 (its neighbour) and 3 may notice
        logits2, h2, _ = net.step(*inputs, phase="update")
    for i in (0, 1):
        assert torch.equal(logits[:, i], logits2[:, i]) and torch.equal(h[:, i], h2[:, i])
    assert not torch.allclose(logits[:, 2], logits2[:, 2])


def test_agent_loop_and_batched_agree() -> None:
    """The original's per-agent loop and the batched form are the same network."""
    looped, batched = _net(loop=True), _net(loop=False)
    batched.load_state_dict(looped.state_dict())
    obs, h, c, fp = _inputs()
    acts = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]]), 3).float()
    with torch.no_grad():
        for a, b in zip(looped.step(obs, h, c, fp, phase="update"), batched.step(obs, h, c, fp, phase="update"),
                        strict=True):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(looped.value(h, acts, "update"), batched.value(h, acts, "update"))


@pytest.mark.parametrize("loop", [True, False])
def test_gradients_follow_the_graph(loop: bool) -> None:
    """The message of agent 0 reaches agent 1 but not agent 2 within one step."""
    net = _net(loop=loop)
    obs, h, c, fp = _inputs()
    h = h.requires_grad_(True)
    logits, _, _ = net.step(obs, h, c, fp, phase="update")
    (grad,) = torch.autograd.grad(logits[:, 2].sum(), h)
    assert grad[:, 0].abs().sum() == 0 and grad[:, 1].abs().sum() > 0 and grad[:, 3].abs().sum() > 0


@pytest.mark.parametrize("loop", [True, False])
def test_critic_reads_only_neighbour_actions(loop: bool) -> None:
    net = _net(loop=loop)
    _, h, _, _ = _inputs()
    acts = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]]), 3).float()
    with torch.no_grad():
        v = net.value(h, acts, phase="update")
        acts2 = acts.clone()
        acts2[:, 0] = torch.tensor([0.0, 0.0, 1.0])
        v2 = net.value(h, acts2, phase="update")
    assert torch.equal(v[:, 0], v2[:, 0]) and torch.equal(v[:, 2:], v2[:, 2:])
    assert not torch.allclose(v[:, 1], v2[:, 1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("agents, account", [(2, "messages"), (4, "layer")])
def test_real_run_has_comm_phases(tmp_path, agents: int, account: str, no_leftovers) -> None:
    snap = real_run(tmp_path, "neurcomm", agents, 4, "max_cycles=20", f"comm_account={account}")
    names = {p.name for p in snap.phases}
    layer = "comm/" if account == "layer" else ""
    assert {"sample/comm/messages", "sample/comm/encode", f"sample/{layer}lstm", "update/comm/messages",
            "update/comm/encode", f"update/{layer}lstm", "update/heads", "update/comm/actions", "update/backward",
            f"update/{layer}layer_backward", "update/optim"} <= names
    assert snap.iterations == 4 and snap.info.env == "cacc"
    assert 0 < snap.comm_share < 1 and 0 < snap.comm_share_update < 1
    assert snap.counters.get("episodes", 0) >= 4
    # The study's account books the LSTM and the backward through the layer too.
    comm = {p.name for p in snap.phases if p.comm}
    assert ("update/comm/layer_backward" in comm) == (account == "layer")


def test_the_two_accounts_and_the_split_backward_train_the_same() -> None:
    """The accounts differ in span names only, and the backward pass split at the layer's output
    gives the gradients of one pass: equal weights after an update, and equal to a plain backward."""
    from algorithms.configs import NeurCommConfig
    from algorithms.neurcomm import NeurCommLearner, NeurCommRollout

    learners = []
    for account in ("messages", "layer"):
        cfg = NeurCommConfig(agents=3, max_cycles=6, comm_account=account)
        learner = NeurCommLearner(cfg)
        rollout = NeurCommRollout(cfg, 0)
        rollout.load_weights(learner.weights())
        payload = rollout.collect()
        learner.update([payload])
        learners.append((learner, payload))
    (a, payload), (b, _) = learners
    for pa_, pb in zip(a.net.parameters(), b.net.parameters(), strict=True):
        assert torch.equal(pa_, pb)
    # One plain backward through the whole unroll (the old way) gives the same gradients.
    cfg = NeurCommConfig(agents=3, max_cycles=6)
    learner = NeurCommLearner(cfg)
    grads = {}
    orig_step = learner.opt.step
    learner.opt.step = lambda: grads.update({n: p.grad.clone() for n, p in learner.net.named_parameters()})
    learner.update([payload])
    learner.opt.step = orig_step
    net = learner.net
    b_ = {k: torch.from_numpy(payload[k]).transpose(0, 1) for k in ("obs", "act", "rew", "done", "mask")}
    steps, batch = b_["act"].shape[:2]
    onehot = torch.nn.functional.one_hot(b_["act"], net.n_actions).float()
    h, c, fp = net.initial_state(batch)
    logits, values = [], []
    for t in range(steps):
        lg, h, c = net.step(b_["obs"][t], h, c, fp, "update")
        fp = torch.softmax(lg, -1).detach()
        logits.append(lg)
        values.append(net.value(h, onehot[t], "update"))
    from algorithms.common import a2c_loss, compute_gae
    rewards = (b_["rew"] * cfg.reward_scale) @ learner.spatial.T
    values_t = torch.stack(values)
    adv, ret = compute_gae(rewards, values_t.detach(), b_["done"][..., None].expand_as(rewards),
                           torch.zeros(batch, net.n), cfg.gamma, cfg.gae_lambda)
    loss, _ = a2c_loss(torch.stack(logits), b_["act"], adv, values_t, ret, mask=b_["mask"][..., None],
                       value_coef=cfg.value_coef, entropy_coef=cfg.entropy_coef)
    net.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--env", "simple_spread"], "neighbour graph"),
    (["--set", "optimizer=sgd"], "adam or rmsprop"),
])
def test_bad_settings_are_usage_errors(argv, message) -> None:
    proc = marlwatch("run", "--headless", "--algo", "neurcomm", "--iterations", "1", *argv, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
