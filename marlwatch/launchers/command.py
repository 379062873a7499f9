"""A user's own command (`marlwatch run -- python train.py`), watched without code changes.

The command runs in its own process group with the monitor's address and a fresh key in its
environment (MARLWATCH_ADDRESS, MARLWATCH_AUTHKEY); every Python process it starts connects on
its own (docs/your-training.md). The launcher also follows the command's process tree with
psutil, so processes that never connect still get CPU and memory rows.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil

from marlwatch.collector import event_row
from marlwatch.launchers import LaunchError, exit_reason
from marlwatch.monitor import Monitor
from marlwatch.recording import RunInfo

TREE_EVERY_S = 1.0  # how often the process tree is walked for new processes
MAX_TREE = 64  # processes found by walking the tree (connected processes have their own bound)
# A process is named once it is this old: between fork and exec it still has its parent's command
# line (multiprocessing's forkserver was listed as `python train.py` on a loaded machine).
FOUND_SETTLE_S = 2.0
KILL_AFTER_S = 3.0  # between SIGTERM and SIGKILL to the group, once the grace period is over
STDERR_TAIL = 20


def command_title(command: list[str], width: int = 60) -> str:
    text = shlex.join(command)
    return text if len(text) <= width else text[: width - 1] + "…"


def command_role(command: list[str]) -> str:
    """A short name for the command's own process in the Workers panel: `python train.py`."""
    script = next((a for a in command[1:] if a.endswith(".py")), None)
    name = Path(command[0]).name + (f" {Path(script).name}" if script else "")
    return name if len(name) <= 28 else name[:27] + "…"


_IMPORTED = re.compile(r"from\s+([\w.]+)\s+import\b")


def found_role(child: psutil.Process) -> str:
    """The Workers-panel name of a process found in the command's tree (one that never connected):
    `python -c 'from multiprocessing.forkserver import main; ...'` is `pid N (multiprocessing.forkserver)`
    (multiprocessing's helpers, which every vector env and collector starts, are all `python` by
    name), a script is `pid N (python train.py)`, anything else its process name."""
    try:
        argv = child.cmdline()
    except psutil.Error:
        argv = []
    if "-c" in argv[:-1]:
        imported = _IMPORTED.search(argv[argv.index("-c") + 1])
        if imported:
            return f"pid {child.pid} ({imported.group(1)})"
    if argv and any(a.endswith(".py") for a in argv[1:]):
        return f"pid {child.pid} ({command_role(argv)})"
    return f"pid {child.pid} ({child.name()})"


def _git_commit(cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=3)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def autostart_dir() -> str | None:
    """The folder whose sitecustomize.py connects every Python process the command starts."""
    path = Path(__file__).resolve().parent.parent / "_autostart"
    return str(path) if (path / "sitecustomize.py").exists() else None


class CommandLauncher:
    def __init__(self, command: list[str], *, auto_phases: bool = True, log_path: Path | None = None,
                 spans: bool = True) -> None:
        """`log_path`: where the command's stdout and stderr go (the live app owns the terminal);
        None: the command shares marlwatch's terminal."""
        if not command:
            raise LaunchError("no command given after --")
        exe = command[0]
        if shutil.which(exe) is None:
            if os.sep in exe and Path(exe).exists():
                raise LaunchError(f"{exe}: not executable")
            raise LaunchError(f"{exe}: command not found")
        self.command = list(command)
        self.auto_phases = auto_phases
        self.spans = spans
        self.log_path = log_path
        self.cwd = os.getcwd()
        self.proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._log: Any = None
        self._stop_sent_at: float | None = None
        self._tree: dict[int, int] = {}  # pid -> slot, processes found by walking the tree
        self._next_walk = 0.0
        self.stop_signal: int | None = None
        self._sock_dir: str | None = None

    def run_info(self) -> RunInfo:
        return RunInfo(
            algo="command", env="", agents=0, workers=0, seed=0, iterations=None, spans=self.spans,
            procs={"0": command_role(self.command)},
            extra={"launcher": "command", "command": self.command, "cwd": self.cwd,
                   "git_commit": _git_commit(self.cwd), "auto_phases": self.auto_phases},
        )

    def record_stem(self) -> str:
        script = next((a for a in self.command[1:] if a.endswith(".py")), None)
        stem = Path(script).stem if script else Path(self.command[0]).name
        return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)[:40] or "command"

    def describe(self) -> str:
        return command_title(self.command)

    # -- starting --------------------------------------------------------------------------
    def start(self, monitor: Monitor) -> None:
        key = os.urandom(32)
        self._sock_dir = tempfile.mkdtemp(prefix="marlwatch-")  # 0700: only this user reaches the socket
        address = monitor.listen(f"unix:{self._sock_dir}/monitor.sock", key)
        env = dict(os.environ)
        env.update(MARLWATCH_ADDRESS=address, MARLWATCH_AUTHKEY=key.hex(),
                   MARLWATCH_AUTO_PHASES="1" if self.auto_phases else "0",
                   MARLWATCH_SPANS_ENABLED="1" if self.spans else "0")
        boot = autostart_dir()
        if boot and self.auto_phases:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (boot, env.get("PYTHONPATH")) if p)
        out: Any = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        slot = monitor.add_process(command_role(self.command))
        try:
            self.proc = subprocess.Popen(self.command, env=env, process_group=0, stdout=out,
                                         stderr=subprocess.STDOUT if out is not None else None,
                                         stdin=subprocess.DEVNULL if out is not None else None)
        except OSError as e:
            raise LaunchError(f"{self.command[0]}: {e.strerror or e}") from None
        monitor.set_pid(slot, self.proc.pid)
        monitor.procs[slot].state = "running"
        monitor.emit(event_row(monitor.now_ns(), slot, "started", role=monitor.procs[slot].role, pid=self.proc.pid,
                               command=self.command))
        with contextlib.suppress(AttributeError, OSError):
            self._pidfd = os.pidfd_open(self.proc.pid)

    # -- running ---------------------------------------------------------------------------
    def waitables(self) -> list[Any]:
        return [self._pidfd] if self._pidfd is not None and self.running else []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def poll(self, monitor: Monitor, ready: list[Any]) -> None:
        now = time.monotonic()
        if now >= self._next_walk:
            self._next_walk = now + TREE_EVERY_S
            self._walk_tree(monitor)
        if self.proc is not None and self.proc.returncode is None and self.proc.poll() is not None:
            code = self.proc.returncode
            monitor.process_exited(0, code, error=exit_reason(code) if code else None)

    def _walk_tree(self, monitor: Monitor) -> None:
        """New processes of the command get a slot (CPU and memory rows even if they never connect);
        processes that went away are reported as exited."""
        if self.proc is None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        alive = set()
        for child in children:
            alive.add(child.pid)
            if child.pid in self._tree or monitor.slot_for_pid(child.pid) is not None:
                continue
            if len(self._tree) >= MAX_TREE:
                break
            try:
                if time.time() - child.create_time() < FOUND_SETTLE_S:
                    continue
                role = found_role(child)
            except psutil.Error:
                continue
            slot = monitor.add_process(role, pid=child.pid)
            self._tree[child.pid] = slot
            monitor.procs[slot].state = "running"
            monitor.emit(event_row(monitor.now_ns(), slot, "started", role=monitor.procs[slot].role, pid=child.pid,
                                   found=True))
        for pid, slot in list(self._tree.items()):
            if pid not in alive and monitor.procs[slot].exitcode is None:
                del self._tree[pid]
                monitor.process_exited(slot, None)

    def request_stop(self, reason: str) -> None:
        """SIGINT to the command's process group, once: what Ctrl-C would do in a terminal."""
        if self._stop_sent_at is None and self.running:
            self._stop_sent_at = time.monotonic()
            self.stop_signal = signal.SIGINT
            self._signal_group(signal.SIGINT)

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def kill(self, monitor: Monitor) -> None:
        """The grace period is over (or the command ended): SIGTERM, then SIGKILL, to what is left
        of its process group; nothing the command started in its group outlives the run."""
        if self.proc is not None:
            if self.running:
                self.stop_signal = signal.SIGTERM
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + KILL_AFTER_S
            while time.monotonic() < deadline and (self.running or _group_alive(self.proc.pid)):
                time.sleep(0.05)
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
            self.poll(monitor, [])
        for slot in list(self._tree.values()):
            if monitor.procs[slot].exitcode is None:
                monitor.process_exited(slot, None)
        self._tree.clear()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None
        if self._log is not None:
            self._log.close()
        if self._sock_dir is not None:  # the command is gone: nobody else may connect
            shutil.rmtree(self._sock_dir, ignore_errors=True)

    @property
    def stopped_by_us(self) -> bool:
        """The command was asked to stop (q, Ctrl-C, a signal to marlwatch) before it ended."""
        return self._stop_sent_at is not None

    @property
    def exit_code(self) -> int | None:
        """The command's exit code as a shell reports it (128 + N for a signal)."""
        if self.proc is None or self.proc.returncode is None:
            return None
        code = self.proc.returncode
        return 128 - code if code < 0 else code

    def output_tail(self, lines: int = STDERR_TAIL) -> list[str]:
        """The last lines of the command's output (live mode, where it went to the log)."""
        if self.log_path is None:
            return []
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return list(deque(text.splitlines(), maxlen=lines))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
