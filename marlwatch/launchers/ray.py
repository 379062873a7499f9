"""The built-in algorithms on Ray (`marlwatch run --backend ray`): the learner is a local process
(the Ray driver, telemetry on a pipe, as with the local backend) whose rollout workers are Ray
actors (marlwatch/ray_workers.py); the actors report to the monitor's listener.

Without `--ray-address` the learner starts a Ray instance on this machine sized to it (every
core), reachable from this machine only, and stops it at the end. The learner runs in a
process group of its own, which that instance's processes join; a reaper (a small process in
a session of its own) ends the group when the monitor ends, however it ends, so neither q,
Ctrl-C, SIGTERM nor a crash of the monitor leaves a raylet behind. On a cluster
(`--ray-address auto|HOST:PORT`) the monitor listens on every interface, still requiring the
key, and the actors, owned by the learner, end with it (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from typing import Any

from marlwatch.launchers import LaunchError
from marlwatch.launchers.builtin import BuiltinLauncher
from marlwatch.monitor import Monitor
from marlwatch.process import learner_main
from marlwatch.recording import RunInfo

INSTALL_HINT = "pip install 'marlwatch[ray]'"
KILL_AFTER_S = 3.0

# Waits for its standard input to close (the monitor ended, cleanly or not), then ends the
# process group named on its command line: first SIGTERM, then SIGKILL.
_REAPER = """# marlwatch-reaper
import os, signal, sys, time
pgid = int(sys.argv[1])
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
sys.stdin.buffer.read()
for sig, pause in ((signal.SIGTERM, float(sys.argv[2])), (signal.SIGKILL, 0)):
    try:
        os.killpg(pgid, sig)
    except OSError:
        break
    deadline = time.monotonic() + pause
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except OSError:
            break
        time.sleep(0.05)
"""


def start_reaper(pgid: int) -> subprocess.Popen[bytes]:
    """A process that ends process group `pgid` once the caller ends (its standard input closes),
    however the caller ends; in a session of its own, so that no terminal signal reaches it."""
    return subprocess.Popen([sys.executable, "-I", "-c", _REAPER, str(pgid), str(KILL_AFTER_S)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def ray_available() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        return False


class RayLauncher(BuiltinLauncher):
    def __init__(self, cfg: Any, algorithm: Any = None) -> None:
        if not ray_available():
            raise LaunchError(f"--backend ray needs Ray, which is not installed here ({INSTALL_HINT})")
        if cfg.ray_address:
            # The actors run elsewhere: this machine's cores and memory do not bound their number.
            cfg = dataclasses.replace(cfg, ignore_limits=True)
        super().__init__(cfg, algorithm)
        # Ray places the actors; nothing is pinned (the learner neither: it shares its cores with them).
        self.pinning = {slot: None for slot in self.pinning}
        self.ray_address: str | None = cfg.ray_address
        self._reaper: subprocess.Popen[bytes] | None = None
        self._sock_dir: str | None = None
        self._monitor_address, self._key = "", b""  # where and how the actors reach the monitor

    def run_info(self) -> RunInfo:
        info = super().run_info()
        info.extra["backend"] = "ray"
        info.extra["ray_address"] = self.ray_address or "local"
        return info

    def describe(self) -> str:
        where = f"Ray at {self.ray_address}" if self.ray_address else "a local Ray instance"
        return f"{super().describe()} as actors on {where}"

    def start(self, monitor: Monitor) -> None:
        key = os.urandom(32)
        if self.ray_address:
            # Other machines must reach it: every interface, the key still required.
            address = monitor.listen("0.0.0.0:0", key)
        else:
            # 0700, this user's only: the monitor's socket, and the local Ray instance's files
            self._sock_dir = tempfile.mkdtemp(prefix="marlwatch-")
            address = monitor.listen(f"unix:{self._sock_dir}/monitor.sock", key)
        for role in self.roles.values():
            monitor.add_process(role, core=None)
        self._monitor_address, self._key = address, key
        self._start_children(monitor)

    def _spawn_all(self, monitor: Monitor, ctx: Any, stop_r: Connection, child_ends: list[Connection]) -> None:
        """The learner only (the Ray driver: it starts the actors), then the reaper of its group."""
        self._starting = "the learner"
        tel_r, tel_w = ctx.Pipe(duplex=False)
        child_ends.append(tel_w)
        monitor.attach(0, tel_r)
        spec = dataclasses.replace(self._child_spec("learner", 0), backend="ray", ray_address=self.ray_address,
                                   workers=self.workers, monitor_address=self._monitor_address,
                                   authkey=self._key.hex(), ray_tmpdir=self._sock_dir)
        p = ctx.Process(target=learner_main, name="marlwatch-learner", args=(spec, tel_w, [], stop_r), daemon=True)
        self._spawn(monitor, 0, p)
        self._starting = "the reaper"
        self._start_reaper(p.pid)  # type: ignore[arg-type]

    def _start_reaper(self, pgid: int) -> None:
        self._reaper = start_reaper(pgid)

    def kill(self, monitor: Monitor) -> None:
        learner = self._children.get(0)
        super().kill(monitor)
        if self._reaper is not None:
            # The learner is gone: whatever is left of its group (a local Ray instance that did
            # not stop) ends now.
            with contextlib.suppress(OSError):
                self._reaper.stdin.close()  # type: ignore[union-attr]
            try:
                self._reaper.wait(timeout=KILL_AFTER_S + 5)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
            self._reaper = None
        elif learner is not None and learner.pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(learner.pid, signal.SIGKILL)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
