"""Benchmark: what the auto phases cost a program that never imports marlwatch.

Two worker processes run the same third-party-style code: a Gymnasium CartPole with a small torch
policy-gradient (REINFORCE) loop written here, 256 env steps then one update per iteration. One
runs it as `marlwatch run -- COMMAND` would (the start-up hook first on PYTHONPATH, the auto
phases on, connected to a monitor socket that this process drains); the other runs it plain. They
take turns, block by block, so both see the same machine moment by moment; the figure is the ratio
of the medians of their per-iteration times (IPS ratio). Then the cost per hooked call: env.step
(through gym.make's wrappers), backward and optimizer.step, timed in both workers, interleaved,
the plain worker's time subtracted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from _common import REPO, main_for, median, row, spread

TARGET_PCT = 1.0


# -- the worker: code nobody instrumented -------------------------------------------------------
def _worker() -> None:
    import gymnasium as gym
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    env = gym.make("CartPole-v1")
    policy = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    obs, _ = env.reset(seed=0)

    def iteration(steps: int = 256) -> None:
        nonlocal obs
        logps, rewards, dones = [], [], []
        for _ in range(steps):
            dist = torch.distributions.Categorical(logits=policy(torch.as_tensor(obs, dtype=torch.float32)))
            action = dist.sample()
            logps.append(dist.log_prob(action))
            obs, r, term, trunc, _ = env.step(int(action))
            rewards.append(r)
            dones.append(term or trunc)
            if term or trunc:
                obs, _ = env.reset()
        returns, g = [], 0.0
        for r, d in zip(reversed(rewards), reversed(dones), strict=True):
            g = r + 0.99 * g * (not d)
            returns.append(g)
        ret = torch.tensor(returns[::-1])
        loss = -(torch.stack(logps) * (ret - ret.mean()) / (ret.std() + 1e-8)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    x = torch.ones(64, requires_grad=True)
    small_opt = torch.optim.SGD([x], lr=1e-3)

    def per_call(what: str, n: int) -> float:
        if what == "env_step":
            t0 = time.perf_counter_ns()
            for _ in range(n):
                _, _, term, trunc, _ = env.step(0)
                if term or trunc:
                    env.reset()
        elif what == "backward":
            t0 = time.perf_counter_ns()
            for _ in range(n):
                (x * 2).sum().backward()
        else:
            t0 = time.perf_counter_ns()
            for _ in range(n):
                small_opt.step()
        return (time.perf_counter_ns() - t0) / n

    iteration()  # warm-up: imports, allocations, the monitor connection
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "loop":
            times = []
            for _ in range(int(arg)):
                t0 = time.perf_counter()
                iteration()
                times.append(time.perf_counter() - t0)
            print(json.dumps(times), flush=True)
        else:
            print(json.dumps(per_call(cmd, int(arg))), flush=True)


# -- the controller -----------------------------------------------------------------------------
class _Drain:
    """The monitor's socket, read and dropped (the producer's cost is what is measured)."""

    def __init__(self) -> None:
        import tempfile
        from multiprocessing.connection import Listener

        self.key = os.urandom(16)
        self.dir = tempfile.mkdtemp(prefix="mw-bench-")
        self.address = os.path.join(self.dir, "s")
        self.listener = Listener(self.address, family="AF_UNIX", authkey=self.key)
        self.connected = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except Exception:  # noqa: BLE001 - closed
                return
            self.connected += 1
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn) -> None:
        try:
            while True:
                conn.recv_bytes()
        except (EOFError, OSError):
            pass


def _start(hooked: bool, drain: _Drain) -> subprocess.Popen:
    from marlwatch import autostart_dir

    env = {k: v for k, v in os.environ.items() if not k.startswith("MARLWATCH_")}
    path = [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    if hooked:
        path.insert(0, autostart_dir())
        env.update(MARLWATCH_ADDRESS=f"unix:{drain.address}", MARLWATCH_AUTHKEY=drain.key.hex(),
                   MARLWATCH_AUTO_PHASES="1")
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.Popen([sys.executable, __file__, "--worker"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _ask(proc: subprocess.Popen, cmd: str) -> object:
    proc.stdin.write(cmd + "\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"the benchmark worker died (exit {proc.wait()})")
    return json.loads(line)


def measure(quick: bool = False) -> dict:
    drain = _Drain()
    procs = {"hooked": _start(True, drain), "plain": _start(False, drain)}
    try:
        blocks, per_block = (6, 3) if quick else (12, 4)
        times: dict[str, list[float]] = {"hooked": [], "plain": []}
        for b in range(blocks):
            # Alternate which goes first, so neither always follows the other.
            for name in (("hooked", "plain") if b % 2 == 0 else ("plain", "hooked")):
                times[name] += _ask(procs[name], f"loop {per_block}")  # type: ignore[arg-type]
        calls = {"env_step": 2000, "backward": 500, "optimizer": 2000}
        repeats = 5 if quick else 9
        per: dict[str, dict[str, list[float]]] = {w: {"hooked": [], "plain": []} for w in calls}
        for _ in range(repeats):
            for what, n in calls.items():
                for name in ("hooked", "plain"):
                    per[what][name].append(_ask(procs[name], f"{what} {n}"))  # type: ignore[arg-type]
    finally:
        for p in procs.values():
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(30)
        drain.listener.close()
    hooked, plain = median(times["hooked"]), median(times["plain"])
    overhead_pct = (hooked / plain - 1) * 100
    lo, hi = spread(times["plain"])
    out = {
        "iteration_s_hooked": hooked,
        "iteration_s_plain": plain,
        "ips_hooked": 1 / hooked,
        "ips_plain": 1 / plain,
        "overhead_pct": overhead_pct,
        "iterations_each": len(times["plain"]),
        "hooked_connected": drain.connected,
        # Minimums: on a loaded machine the fastest repeat is the one least disturbed.
        "ns_per_call": {w: min(v["hooked"]) - min(v["plain"]) for w, v in per.items()},
        "ns_per_call_plain": {w: min(v["plain"]) for w, v in per.items()},
    }
    out["rows"] = [
        row("auto phases: CartPole+REINFORCE loop IPS cost (%)", f"{overhead_pct:+.2f}", f"< {TARGET_PCT}",
            overhead_pct < TARGET_PCT,
            f"IPS {1 / plain:.2f} plain vs {1 / hooked:.2f} hooked; {len(times['plain'])} iterations each, "
            f"interleaved blocks; plain range {lo * 1e3:.0f}-{hi * 1e3:.0f} ms"),
    ]
    for what, label in [("env_step", "env.step (gym.make's wrappers)"), ("backward", "backward()"),
                        ("optimizer", "optimizer.step()")]:
        out["rows"].append(row(f"auto phase cost per {label} (ns)", f"{out['ns_per_call'][what]:.0f}", "", None,
                               f"fastest of {repeats} interleaved repeats; the call itself "
                               f"{out['ns_per_call_plain'][what]:.0f} ns unhooked"))
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
        raise SystemExit(0)
    raise SystemExit(main_for(measure))
