"""Auto phases on programs that never import marlwatch: Gymnasium, PettingZoo, vector-env workers
and torch, in real processes started with the start-up hook, against a real Listener."""

from __future__ import annotations

import textwrap
from collections import Counter

import pytest

from tests.tiny_monitor import TinyMonitor, python


@pytest.fixture
def monitor():
    with TinyMonitor() as m:
        yield m


CARTPOLE = textwrap.dedent("""
    import gymnasium as gym
    import torch

    class Noisy(gym.Wrapper):  # defined after the hook was installed, overrides step
        def step(self, action):
            return super().step(action)

    env = Noisy(gym.make("CartPole-v1"))  # and gym.make adds its own wrappers
    obs, _ = env.reset(seed=0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for it in range(3):
        for _ in range(5):
            obs, r, term, trunc, _ = env.step(env.action_space.sample())
            if term or trunc:
                obs, _ = env.reset()
        loss = net(torch.as_tensor(obs)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
""")


def test_a_gymnasium_and_torch_loop_records_phases_and_iterations_unmodified(monitor, tmp_path):
    proc = python(CARTPOLE, monitor.env(auto_phases=True, bootstrap=True), tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    monitor.wait_ended(1)
    (hello,) = monitor.hellos()
    assert hello["auto_phases"] is True
    spans = Counter(monitor.spans(0))
    # One env_step per env.step() although five `step`s (ours, gym.make's wrappers, CartPole) run.
    assert spans == {("sample/env_step", None): 15, ("update/backward", None): 3, ("update/optimizer", None): 3}
    # Two sample-after-update starts, and the last cycle closed at exit.
    assert monitor.ticks(0) == 3


def test_auto_phases_nest_in_the_programs_own_spans_and_its_ticks_win(monitor, tmp_path):
    script = CARTPOLE.replace("    loss.backward()\n    opt.step()\n", textwrap.indent(textwrap.dedent("""
        import marlwatch
        with marlwatch.span("update"):
            loss.backward()
            opt.step()
        marlwatch.tick()
    """), "    "))
    assert "marlwatch.tick()" in script
    proc = python(script, monitor.env(auto_phases=True, bootstrap=True), tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    monitor.wait_ended(1)
    spans = Counter(monitor.spans(0))
    assert spans == {("sample/env_step", None): 15, ("update", None): 3,
                     ("update/backward", "update"): 3, ("update/optimizer", "update"): 3}
    assert monitor.ticks(0) == 3  # the program's own, and no auto tick beside them


def test_a_failed_optimizer_step_leaves_no_span_open(monitor, tmp_path):
    script = textwrap.dedent("""
        import torch
        import marlwatch

        class Flaky(torch.optim.SGD):
            calls = 0
            def step(self, closure=None):
                Flaky.calls += 1
                if Flaky.calls == 2:
                    raise FloatingPointError("nan")
                return super().step(closure)

        net = torch.nn.Linear(2, 1)
        opt = Flaky(net.parameters(), lr=0.1)
        for _ in range(4):
            with marlwatch.span("update"):
                net(torch.ones(2)).sum().backward()
                try:
                    opt.step()
                except FloatingPointError:
                    pass
            with marlwatch.span("sample"):
                pass
    """)
    proc = python(script, monitor.env(auto_phases=True, bootstrap=True), tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    monitor.wait_ended(1)
    spans = Counter(monitor.spans(0))
    assert spans == {("update", None): 4, ("sample", None): 4, ("update/backward", "update"): 4,
                     ("update/optimizer", "update"): 3}


def test_pettingzoo_parallel_env_steps_are_one_span_each(monitor, tmp_path):
    script = textwrap.dedent("""
        from mpe2 import simple_spread_v3
        env = simple_spread_v3.parallel_env(N=2, max_cycles=10)
        env.reset(seed=0)
        for _ in range(6):
            env.step({a: env.action_space(a).sample() for a in env.agents})
    """)
    proc = python(script, monitor.env(auto_phases=True, bootstrap=True), tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    monitor.wait_ended(1)
    # parallel_env is an AEC env turned parallel: its AEC steps run inside and are not spans.
    assert Counter(monitor.spans(0)) == {("sample/env_step", None): 6}


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_vector_env_workers_connect_each_with_their_role(monitor, tmp_path, context):
    script = textwrap.dedent(f"""
        import gymnasium as gym

        if __name__ == "__main__":
            envs = gym.vector.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2, context="{context}")
            envs.reset(seed=0)
            for _ in range(4):
                envs.step(envs.action_space.sample())
            envs.close()
    """)
    proc = python(script, monitor.env(auto_phases=True, bootstrap=True), tmp_path, timeout=180)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    monitor.wait_ended(3)
    roles = monitor.by_role()
    workers = sorted(r for r in roles if r.startswith("AsyncVectorEnv worker"))
    assert len(workers) == 2, roles
    for role in workers:
        assert Counter(monitor.spans(roles[role])) == {("sample/env_step", None): 4}
    (parent,) = [i for r, i in roles.items() if r not in workers]
    assert Counter(monitor.spans(parent)) == {("sample/env_step", None): 4}
