"""Programs for the tests of `marlwatch run -- COMMAND` and `marlwatch listen`: small training-like
loops that connect to a monitor the way a user's process does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

# A loop that connects itself (MARLWATCH_ADDRESS/AUTHKEY from its environment), so these tests
# exercise the monitor side whatever the process side does on import.
SELF_CONNECTING_LOOP = r'''
import os, sys, time
from multiprocessing.connection import Client
import marlwatch
from marlwatch.instrument import connect
address = os.environ["MARLWATCH_ADDRESS"]
if address.startswith("unix:"):
    target, family = address[5:], "AF_UNIX"
else:
    host, port = address.rsplit(":", 1)
    target, family = (host, int(port)), "AF_INET"
conn = Client(target, family=family, authkey=bytes.fromhex(os.environ["MARLWATCH_AUTHKEY"]))
connect(conn, role=os.environ.get("LOOP_ROLE", "my loop"), pid=os.getpid())
iterations = int(sys.argv[1])
for i in range(iterations):
    with marlwatch.span("sample/env_step"):
        time.sleep(0.004)
    with marlwatch.span("update"):
        with marlwatch.span("update/comm/messages"):
            time.sleep(0.002)
        time.sleep(0.002)
    marlwatch.tick()
print("loop done", flush=True)
print("the loop's last words", file=sys.stderr, flush=True)
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
'''


def write_loop(tmp_path: Path) -> Path:
    path = tmp_path / "loop.py"
    path.write_text(SELF_CONNECTING_LOOP)
    return path


def env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def start_marlwatch(*args: str, **kw) -> subprocess.Popen:
    """The real CLI in its own session (so a test can signal its whole process group)."""
    return subprocess.Popen([sys.executable, "-m", "marlwatch", *args], cwd=kw.pop("cwd", REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=kw.pop("env", env_with_repo()), **kw)


def read_exports(proc: subprocess.Popen, timeout: float = 60) -> dict[str, str]:
    """The `export NAME=VALUE` lines `marlwatch listen` prints first."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(found) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "listen printed no export lines"
        line = proc.stdout.readline()
        if line.startswith("export "):
            name, _, value = line[len("export "):].strip().partition("=")
            found[name] = value
    return found


def listen_with(path: Path, *programs: list[str], timeout: float = 120) -> None:
    """`marlwatch listen --headless --record PATH` with each program (the arguments of a Python
    command, run with the monitor's address and key) run to its end in turn, printing `done`;
    then Ctrl-C, which completes the recording."""
    listen = start_marlwatch("listen", "--headless", "--record", str(path))
    try:
        env = {**env_with_repo(), **read_exports(listen)}
        for args in programs:
            r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
            assert r.returncode == 0 and "done" in r.stdout, r.stderr
        listen.send_signal(signal.SIGINT)
        listen.communicate(timeout=60)
    finally:
        if listen.poll() is None:
            listen.kill()
