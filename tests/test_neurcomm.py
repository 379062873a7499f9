"""NeurComm: messages only flow along the neighbour graph; real runs record the comm phases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from algorithms.neurcomm import NeurCommNet, hop_distances, neighbour_table
from marlwatch.metrics import summarize
from marlwatch.recording import open_recording
from tests.conftest import marlwatch

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
@pytest.mark.parametrize("agents", [2, 4])
def test_real_run_has_comm_phases(tmp_path, agents: int, no_leftovers) -> None:
    path = tmp_path / "nc.arrow"
    proc = marlwatch("run", "--headless", "--algo", "neurcomm", "--agents", str(agents), "--workers", "1",
                     "--iterations", "4", "--record", str(path), "--set", "max_cycles=20")
    assert proc.returncode == 0, proc.stderr
    snap = summarize(open_recording(path))
    names = {p.name for p in snap.phases}
    assert {"sample/comm/messages", "sample/comm/encode", "update/comm/messages", "update/comm/encode",
            "update/comm/actions", "update/backward"} <= names
    assert snap.iterations == 4 and snap.info.env == "cacc"
    assert 0 < snap.comm_share < 1 and 0 < snap.comm_share_update < 1
    assert snap.counters.get("episodes", 0) >= 4


@pytest.mark.parametrize("argv, message", [
    (["--env", "simple_spread"], "neighbour graph"),
    (["--set", "optimizer=sgd"], "adam or rmsprop"),
])
def test_bad_settings_are_usage_errors(argv, message) -> None:
    proc = marlwatch("run", "--headless", "--algo", "neurcomm", "--iterations", "1", *argv, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
