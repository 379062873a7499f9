"""A run: a monitor driven together with a launcher (or none, for `marlwatch listen`).

`Run` is what headless `run`, `listen`, `sweep`, the live app and `bench/` drive, all through
`drive()`: start, pump until the launcher's processes end or a stop is asked, finish. Each pump
reads what arrived, writes it to the recording and hands it to `listeners` (Metrics, flame), so
the live view and a replay of the file read the same rows.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from marlwatch import recording
from marlwatch.collector import event_row
from marlwatch.launchers import Launcher, LaunchError, StartFailed
from marlwatch.lifecycle import STOP_SIGNALS
from marlwatch.monitor import Monitor, ProcState
from marlwatch.recording import RunInfo

STOP_GRACE_S = 10.0
PRIVATE_SOCKET = "private"  # RunConfig.listen: a Unix socket in a 0700 folder made (and removed) by the run

class RunError(Exception):
    """A run whose processes could not all be started; the message is one line for the user."""


__all__ = ["RunError", "STOP_GRACE_S", "ProcState", "Run", "RunConfig", "default_record_path", "drive", "stop_on_signals"]


@dataclass
class RunConfig:
    algo: str = "maddpg"
    env: str = ""
    agents: int = 3
    workers: int = 0  # 0: one per core
    iterations: int | None = 500
    seed: int = 0
    spans: bool = True
    record: str | None = None  # None: a new file under runs/ (recording.default_record_path)
    overwrite: bool = False  # `--force`: an existing `record` file is replaced, not refused
    ignore_limits: bool = False  # `--ignore-limits`: skip the machine checks of marlwatch.limits
    keep_going: bool = False
    spans_ab: int = 0  # > 0: spans on/off in alternating blocks of this many iterations (overhead A/B)
    sample_hz: float = 10.0
    settings: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None  # a user's command instead of a built-in algorithm
    auto_phases: bool = True  # with `command`: hooks in its processes find phases (docs/your-training.md)
    command_log: bool = False  # with `command`: its output goes to NAME.log beside the recording (live app)
    listen: str | None = None  # an address to accept telemetry connections on (`marlwatch listen`)
                               # or PRIVATE_SOCKET: a Unix socket in a folder made for this run
    backend: str = "local"  # or "ray": rollout workers as Ray actors (marlwatch/launchers/ray.py)
    ray_address: str | None = None  # with backend "ray": a cluster ("auto", HOST:PORT); None starts one here

    def resolved_workers(self) -> int:
        return self.workers or (os.cpu_count() or 1)


def default_record_path(stem: str) -> Path:
    """The base of a run's default name; the writer takes the first free one of it, -2, -3, ..."""
    return recording.default_record_path(stem)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("marlwatch", "torch", "numpy", "pyarrow", "pettingzoo", "mpe2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def make_launcher(cfg: RunConfig, algorithm: Any = None) -> Launcher | None:
    """The launcher `cfg` asks for: a command, the built-in algorithms, or none (listen)."""
    if cfg.command is not None:
        from marlwatch.launchers.command import CommandLauncher

        return CommandLauncher(cfg.command, auto_phases=cfg.auto_phases, spans=cfg.spans)
    if cfg.listen is not None:
        return None
    if cfg.backend == "ray":
        from marlwatch.launchers.ray import RayLauncher

        return RayLauncher(cfg, algorithm)
    from marlwatch.launchers.builtin import BuiltinLauncher

    return BuiltinLauncher(cfg, algorithm)


class Run:
    """A monitor and its launcher; `pump` until not `alive`, then `finish`."""

    def __init__(self, cfg: RunConfig, algorithm: Any = None, *, launcher: Launcher | None = None) -> None:
        """`algorithm` overrides the registry lookup of `cfg.algo` (a user's own AlgorithmSpec)."""
        self.cfg = cfg
        self.launcher = launcher if launcher is not None else make_launcher(cfg, algorithm)
        if self.launcher is not None:
            info = self.launcher.run_info()
            stem = self.launcher.record_stem()
        else:
            info = RunInfo(algo="listen", env="", agents=0, workers=0, seed=0, iterations=None, spans=cfg.spans,
                           extra={"launcher": "listen"})
            stem = "listen"
        info.host, info.cores = socket.gethostname(), os.cpu_count() or 1
        info.start_unix, info.versions = time.time(), _versions()
        self.info = info
        record_path = Path(cfg.record) if cfg.record else default_record_path(stem)
        self.monitor = Monitor(info, record_path, sample_hz=cfg.sample_hz)
        self.monitor.on_process_event = self._on_process_event
        self.stop_reason: str | None = None
        self.stop_signal: int | None = None  # the signal that asked for the stop, if one did
        self.failure: str | None = None  # why the run ended badly (a crash, a full disk)
        self._failure_is_consequence = False
        self.started = False
        self.finished = False
        self._private_dir: str | None = None

    @property
    def record_path(self) -> Path:
        """Where the recording is (set before `start`; a default name may move to -2, -3, ...)."""
        return self.monitor.record_path

    @record_path.setter
    def record_path(self, path: Path) -> None:
        self.monitor.record_path = Path(path)

    # The monitor's surface, for the views, flame and tests.
    @property
    def procs(self) -> dict[int, ProcState]:
        return self.monitor.procs

    @property
    def streams(self) -> dict[int, Any]:
        return self.monitor.streams

    @property
    def listeners(self) -> list[Callable[[pa.RecordBatch], None]]:
        return self.monitor.listeners

    @property
    def hooks(self) -> list[Callable[[bool], None]]:
        return self.monitor.hooks

    @property
    def writer(self) -> Any:
        return self.monitor.writer

    @property
    def workers(self) -> int:
        return self.info.workers

    @property
    def recording_bytes(self) -> int:
        return self.monitor.recording_bytes

    def now_ns(self) -> int:
        return self.monitor.now_ns()

    def emit(self, batch: pa.RecordBatch) -> None:
        """Add rows of our own (SCHEMA) to the run: recorded and passed to listeners."""
        self.monitor.emit(batch)

    def describe(self) -> str:
        if self.launcher is not None:
            return self.launcher.describe()
        return f"listening on {self.monitor.address}"

    # -- starting --------------------------------------------------------------------------
    def start(self) -> None:
        """Create the recording, then start the processes (the recording first: a path that cannot
        be written fails before anything starts). Raises RecordingError, LaunchError, OSError."""
        if self.cfg.listen is not None:  # before the file exists: an address in use is a usage error
            address = self.cfg.listen
            if address == PRIVATE_SOCKET:
                self._private_dir = tempfile.mkdtemp(prefix="marlwatch-")  # 0700: this user only
                address = f"unix:{self._private_dir}/monitor.sock"
            try:
                self.monitor.listen(address, _authkey())
            except (OSError, ValueError) as e:
                raise LaunchError(f"cannot listen on {self.cfg.listen}: {getattr(e, 'strerror', None) or e}") from None
        # Fails before any process starts. A default name is made unique when the file is created.
        self.monitor.open(overwrite=self.cfg.overwrite, unique=self.cfg.record is None)
        if self.cfg.command_log and self.launcher is not None:
            self.launcher.log_path = self.record_path.with_suffix(".log")  # NAME.log beside NAME.arrow
        self.started = True
        if self.launcher is not None:
            try:
                self.launcher.start(self.monitor)
            except StartFailed as e:
                # Too many processes (ulimit -u, a cgroup's pids.max), open files or memory: no run,
                # but no traceback either, no child left, and a recording that says what happened.
                self._start_failed(str(e))
                raise RunError(f"{self.failure} (recording kept: {self.record_path})") from None
            except BaseException:
                self._start_failed("interrupted while starting")
                raise
        self.emit(event_row(self.now_ns(), None, "run_started", workers=self.info.workers, algo=self.info.algo))
        self.monitor.deliver()
        if self.stop_reason is not None and self.launcher is not None:
            self.launcher.request_stop(self.stop_reason)

    def _start_failed(self, why: str) -> None:
        self.failure = why
        self.stop_reason = "could not start"
        self.emit(event_row(self.now_ns(), None, "start_failed", error=why))
        for st in self.monitor.procs.values():  # those started would wait for the others forever:
            if st.pid is not None and not st.ended:
                st.state = "stopped"  # we stop them, they did not crash
        self.abort()

    # -- running ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        if self.finished:
            return False
        if self.launcher is None:  # listen: until stopped
            return self.stop_reason is None
        return self.launcher.running or self.monitor.connected

    def pump(self, timeout: float = 0.1) -> None:
        """Read whatever arrives within `timeout` s; record it and feed the listeners."""
        waitables = self.launcher.waitables() if self.launcher is not None else []
        ready = self.monitor.pump(timeout, waitables)
        if self.launcher is not None:
            self.launcher.poll(self.monitor, ready)
        self.monitor.run_hooks(False)  # and hands on the rows, when due
        if self.monitor.write_failure and self.failure is None:
            self.fail(self.monitor.write_failure)  # disk full or alike: a run nobody records is not worth it

    def _on_process_event(self, st: ProcState, name: str, detail: dict[str, Any]) -> None:
        # A worker's death reaches us twice, in either order: the learner's "stopped: worker N is
        # gone" (a consequence) and the worker's own exit status (the cause, with how it died).
        main = st.slot == 0 and self.launcher is not None
        if name == "crashed":
            self.fail(f"{st.role} crashed: {st.error}", main=main)
        elif name == "stopped" and self.stop_reason is None:
            self.fail(f"{st.role} stopped: {detail.get('reason')}", consequence=True, main=main)
        elif name == "exited":
            if st.state == "crashed" and st.exitcode is not None and not self._stopped_by_us(st.exitcode):
                self.fail(f"{st.role} (pid {st.pid}) {st.error}", main=main)
            if main:
                self.request_stop("learner ended" if self.cfg.command is None else "command ended")

    def _stopped_by_us(self, exitcode: int) -> bool:
        # A command we asked to stop (SIGINT, then SIGTERM) dies of it: that is the stop, not a crash.
        return self.cfg.command is not None and self.stop_reason is not None and exitcode in (
            -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL, 130, 143)

    def fail(self, why: str, *, consequence: bool = False, main: bool = False) -> None:
        if self.failure is None or (self._failure_is_consequence and not consequence):
            first = self.failure is None
            self.failure = why
            self._failure_is_consequence = consequence
            if first and (not self.cfg.keep_going or main):
                self.request_stop(why)

    # -- stopping --------------------------------------------------------------------------
    def request_stop(self, reason: str = "stopped by user") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.launcher is not None and self.started:
            self.launcher.request_stop(reason)

    def finish(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the run (if it still runs), wait for its processes, close the recording."""
        if self.finished:
            return
        self.request_stop()
        deadline = time.monotonic() + grace_s
        while self.alive and time.monotonic() < deadline:
            self.pump(0.1)
        self.abort()

    def abort(self, reason: str | None = None) -> None:
        """End now: kill what is left, close the recording with what arrived (a forced stop)."""
        if self.finished:
            return
        if reason is not None and self.stop_reason is None:
            self.stop_reason = reason
        if self.launcher is not None and self.started:
            self.launcher.kill(self.monitor)
        self.monitor.deliver()
        self.monitor.run_hooks(True)
        self.monitor.close({"stop_reason": self.stop_reason, "failure": self.failure})
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
        self.finished = True



def _authkey() -> bytes:
    key = os.environ.get("MARLWATCH_AUTHKEY")
    if key:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(key)
    return os.urandom(32)


def drive(run: Run, *, every: Callable[[], None] | None = None, period_s: float = 1.0,
          should_stop: Callable[[], bool] | None = None, time_limit_s: float | None = None) -> Run:
    """Start `run` if needed and pump it to its end: the launcher's processes are done, a stop was
    asked (`run.request_stop`, `should_stop()`), or `time_limit_s` passed. `every` is called each
    `period_s`. The recording is closed on return; a KeyboardInterrupt (a second Ctrl-C) forces
    the end, keeps what was recorded, and is re-raised."""
    if not run.started:
        run.start()
    deadline = time.monotonic() + time_limit_s if time_limit_s else None
    try:
        next_call = time.monotonic() + period_s
        while run.alive:
            if should_stop is not None and should_stop():
                break
            if deadline is not None and time.monotonic() >= deadline:
                run.request_stop("time limit")
                break
            run.pump(min(0.2, period_s))
            if every is not None and time.monotonic() >= next_call:
                next_call = time.monotonic() + period_s
                run.monitor.deliver()  # what `every` shows is up to this moment
                every()
        run.finish()
    except KeyboardInterrupt:
        run.abort("forced")
        raise
    return run


@contextlib.contextmanager
def stop_on_signals(run: Run, on_first: Callable[[int], None] | None = None) -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal or SSH session) stop the run cleanly: the
    recording is completed. A second one forces the end (KeyboardInterrupt in the driving loop);
    one after the run has finished (a stop can take less time than a double Ctrl-C) is ignored,
    so a complete run's summary and exit status are not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread (the live app has its own)
        return
    count = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal count
        if run.finished:
            return
        count += 1
        if count == 1:
            run.stop_signal = signum
            run.request_stop("stopped by " + signal.Signals(signum).name)
            if on_first is not None:
                on_first(signum)
        else:
            raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
