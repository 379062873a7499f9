"""A run: the learner and worker processes, their telemetry, the system sampler, the recording.

`Run` is driven by whoever shows it: the headless CLI loop or the live app's reader thread call
`pump()` repeatedly; each call reads what arrived, writes it to the recording and returns it as
Arrow batches (the same rows the recording holds, so live view and replay share one path).
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import platform
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pyarrow as pa

from algorithms.base import AlgorithmSpec
from marlwatch import recording, wire
from marlwatch.collector import ProcStream, core_rows, event_row, proc_rows
from marlwatch.limits import check_machine
from marlwatch.process import ChildSpec, learner_main, worker_main
from marlwatch.recording import SCHEMA, RecordingError, RecordingWriter, RunInfo
from marlwatch.sysstats import CoreSampler, ProcSampler

STOP_GRACE_S = 10.0


class RunError(Exception):
    """A run that cannot start; the message is one line for the user."""


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

    def resolved_workers(self) -> int:
        return self.workers or (os.cpu_count() or 1)


@dataclass
class ProcState:
    slot: int
    role: str
    pid: int | None = None
    core: int | None = None
    state: str = "starting"  # starting, running, finished, crashed, stopped
    error: str | None = None
    exitcode: int | None = None


def default_record_path(algo: str) -> Path:
    """The base of a run's default name; the writer takes the first free one of it, -2, -3, ..."""
    return recording.default_record_path(algo)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("marlwatch", "torch", "numpy", "pyarrow", "pettingzoo", "mpe2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# What usually lies behind an OSError from creating a process or a pipe, for the user to act on.
_LIMITS = {errno.EAGAIN: "is the limit on processes, ulimit -u or a cgroup's pids.max, reached?",
           errno.EMFILE: "is the limit on open files, ulimit -n, reached?",
           errno.ENOMEM: "is the memory full?"}


def _os_reason(e: OSError) -> str:
    hint = _LIMITS.get(e.errno) if e.errno is not None else None
    return (e.strerror or str(e)) + (f" ({hint})" if hint else "")


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Run:
    def __init__(self, cfg: RunConfig, algorithm: AlgorithmSpec | None = None) -> None:
        """`algorithm` overrides the registry lookup of `cfg.algo` (a user's own algorithm)."""
        from algorithms import get_algorithm, make_config

        self.cfg = cfg
        self.spec = algorithm or get_algorithm(cfg.algo)  # raises KeyError with a message
        self.workers = cfg.resolved_workers()
        self.algo_config = make_config(self.spec, env=cfg.env, agents=cfg.agents, workers=self.workers,
                                       seed=cfg.seed, settings=cfg.settings)
        if not cfg.ignore_limits:  # memory and processes vs this machine: LimitError, a ValueError
            check_machine(self.algo_config, self.workers, cfg.iterations)
        self.record_path = Path(cfg.record) if cfg.record else default_record_path(cfg.algo)
        cores = os.cpu_count() or 1
        can_pin = hasattr(os, "sched_setaffinity")
        # The learner takes core 0; workers spread over the cores after it, wrapping around.
        self.pinning = {0: 0 if can_pin else None}
        for w in range(1, self.workers + 1):
            self.pinning[w] = (w % cores) if can_pin else None
        self.procs: dict[int, ProcState] = {0: ProcState(0, "learner")}
        for w in range(1, self.workers + 1):
            self.procs[w] = ProcState(w, f"worker {w}")
        self.info = RunInfo(
            algo=cfg.algo,
            env=self.algo_config.env,
            agents=cfg.agents,
            workers=self.workers,
            seed=cfg.seed,
            iterations=cfg.iterations,
            spans=cfg.spans,
            host=socket.gethostname(),
            cores=cores,
            start_unix=time.time(),
            versions=_versions(),
            pinning={str(k): v for k, v in self.pinning.items()},
            procs={str(k): p.role for k, p in self.procs.items()},
            extra={"settings": cfg.settings, "config": {k: v for k, v in vars(self.algo_config).items()
                                                        if isinstance(v, int | float | str | bool)},
                   **({"spans_ab": cfg.spans_ab} if cfg.spans_ab else {})},
        )
        self.writer: RecordingWriter | None = None
        self.t0_ns = time.perf_counter_ns()
        self.streams: dict[int, ProcStream] = {}
        self._conns: dict[Connection, int] = {}
        self._children: dict[int, mp.process.BaseProcess] = {}
        self._stop: Connection | None = None  # monitor's end of the learner's stop pipe
        self._stopping = False
        self.core_sampler = CoreSampler()
        self.proc_sampler = ProcSampler()
        self._next_sample = 0.0
        self.stop_reason: str | None = None
        self.failure: str | None = None  # why the run ended badly (worker crash, disk full)
        self._failure_is_consequence = False
        self.started = False
        self.listeners: list[Callable[[pa.RecordBatch], None]] = []
        # Called with final=False at the end of every pump() and with final=True by finish()
        # before the recording closes: lets a helper (marlwatch.flame) act in the pumping thread.
        self.hooks: list[Callable[[bool], None]] = []
        self.flame: Any = None  # a marlwatch.flame.FlameController when --flame / --auto-flame asked for one
        self._out: list[pa.RecordBatch] = []
        self._pending: list[pa.RecordBatch] = []  # rows not yet delivered (see _deliver)

    # -- starting --------------------------------------------------------------------------
    def start(self) -> None:
        # Fails before any process starts. A default name is made unique when the file is created.
        self.writer = RecordingWriter(self.record_path, self.info, overwrite=self.cfg.overwrite,
                                      unique=self.cfg.record is None)
        self.record_path = self.writer.path
        ctx = mp.get_context("spawn")
        self.t0_ns = time.perf_counter_ns()
        for slot in self.procs:
            self.streams[slot] = ProcStream(slot, self.t0_ns)
        child_ends: list[Connection] = []  # the children's ends of the pipes, and the learner's data ends
        starting = "the resource tracker"
        try:
            # Spawning starts multiprocessing's resource tracker on first use, and that code unblocks
            # SIGINT on its way out: inside _spawn's window, the child would then start unprotected.
            # Started here, out of the window, it is not started again in there.
            resource_tracker.ensure_running()
            # A pipe, not an Event: no semaphore, no resource-tracker process, and the learner also
            # stops when the monitor dies (the pipe reads EOF).
            stop_r, self._stop = ctx.Pipe(duplex=False)
            child_ends.append(stop_r)
            learner_data: list[Connection] = []
            for w in range(1, self.workers + 1):
                starting = f"worker {w}"
                tel_r, tel_w = ctx.Pipe(duplex=False)
                child_ends.append(tel_w)
                self._conns[tel_r] = w  # ours to close from here on, whatever happens
                a, b = ctx.Pipe(duplex=True)
                learner_data.append(a)
                child_ends += [a, b]
                p = ctx.Process(target=worker_main, name=f"marlwatch-worker-{w}",
                                args=(self._child_spec("worker", w), tel_w, b), daemon=True)
                self._spawn(w, p)
            starting = "the learner"
            tel_r, tel_w = ctx.Pipe(duplex=False)
            child_ends.append(tel_w)
            self._conns[tel_r] = 0
            p = ctx.Process(target=learner_main, name="marlwatch-learner",
                            args=(self._child_spec("learner", 0), tel_w, learner_data, stop_r), daemon=True)
            self._spawn(0, p)
        except OSError as e:
            # Too many processes (ulimit -u, a cgroup's pids.max), open files or memory: no run,
            # but no traceback either, no child left, and a recording that says what happened.
            self._start_failed(f"cannot start {starting}: {_os_reason(e)}", child_ends)
            raise RunError(f"{self.failure} (recording kept: {self.record_path})") from None
        # Our copies of the children's pipe ends must go, or a dead child's pipe never reads EOF.
        for c in child_ends:
            c.close()
        self.started = True
        self._emit(event_row(self.now_ns(), None, "run_started", workers=self.workers, algo=self.cfg.algo))
        self._deliver()
        if self.stop_reason is not None:
            # A stop asked for before the stop pipe existed (a Ctrl-C delivered when starting the
            # resource tracker unblocked SIGINT, say) had nothing to send on: send it now.
            self.request_stop(self.stop_reason)

    def _start_failed(self, why: str, child_ends: list[Connection]) -> None:
        self.failure = why
        self.stop_reason = "could not start"
        self._emit(event_row(self.now_ns(), None, "start_failed", error=why))
        for slot in self._children:  # those started so far would wait for the others forever:
            self.procs[slot].state = "stopped"  # we stop them, they did not crash
        self.kill_children()
        for c in [*child_ends, *self._conns, *([self._stop] if self._stop else [])]:
            c.close()
        self._conns.clear()
        self._stop = None
        self.finish(grace_s=0)  # closes the recording, with the failure in its end row

    def _child_spec(self, role: str, slot: int) -> ChildSpec:
        return ChildSpec(role=role, slot=slot, core=self.pinning[slot], algorithm=self.spec, config=self.algo_config,
                         iterations=self.cfg.iterations, spans=self.cfg.spans, keep_going=self.cfg.keep_going,
                         spans_ab=self.cfg.spans_ab)

    def _spawn(self, slot: int, p: mp.process.BaseProcess) -> None:
        # A spawned child spends a while importing before its bootstrap ignores SIGINT; a Ctrl-C to
        # the terminal's process group then killed it with KeyboardInterrupt and the run reported a
        # crash. So the child starts with SIGINT blocked: the signal mask survives fork and exec,
        # a blocked SIGINT stays pending, and the child's bootstrap ignores it before unblocking.
        # The monitor only blocks it in this thread, and keeps its own handler meanwhile: a Ctrl-C
        # in the window goes to another of its threads (pyarrow's) or waits for the unblock, and is
        # handled either way. (It used to be ignored here as well, and a Ctrl-C that the kernel
        # gave to another thread was then dropped: the run went on to its last iteration.)
        main = threading.current_thread() is threading.main_thread()
        if main:  # the live app spawns from its worker thread: it cannot touch signals, nor needs to
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            p.start()
        finally:
            if main:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._children[slot] = p
        st = self.procs[slot]
        st.pid, st.core = p.pid, self.pinning[slot]
        self.proc_sampler.watch(slot, p.pid)  # type: ignore[arg-type]

    # -- running ---------------------------------------------------------------------------
    def now_ns(self) -> int:
        return time.perf_counter_ns() - self.t0_ns

    @property
    def alive(self) -> bool:
        return any(p.is_alive() for p in self._children.values()) or bool(self._conns)

    def pump(self, timeout: float = 0.1) -> list[pa.RecordBatch]:
        """Read whatever arrived within `timeout` s; record it; return the new rows."""
        self._out = out = []
        sentinels = {p.sentinel: slot for slot, p in self._children.items() if self.procs[slot].exitcode is None}
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, min(deadline - time.monotonic(), self._next_sample - time.monotonic()))
            ready = wait([*self._conns, *sentinels], remaining) if (self._conns or sentinels) else []
            if not (self._conns or sentinels):
                time.sleep(remaining)
            for obj in ready:
                if obj in self._conns:
                    self._drain(obj)  # type: ignore[arg-type]
            for obj in ready:
                if obj in sentinels:
                    self._child_exited(sentinels.pop(obj))  # type: ignore[index]
            if time.monotonic() >= self._next_sample:
                self._sample()
            if time.monotonic() >= deadline or not self.alive:
                break
        self._deliver()
        for hook in self.hooks:
            hook(False)
        self._deliver()  # what the hooks emitted
        return out

    def _drain(self, conn: Connection, limit: int = 64) -> None:
        slot = self._conns[conn]
        for _ in range(limit):
            try:
                if not conn.poll():
                    return
                frame = conn.recv_bytes()
            except (EOFError, OSError):
                del self._conns[conn]
                conn.close()
                return
            try:
                msg = wire.decode(frame)
            except wire.ProtocolError as e:
                self._emit(event_row(self.now_ns(), slot, "protocol_error", error=str(e)))
                continue
            if isinstance(msg, wire.Control):
                self._control(slot, msg.message)
            else:
                try:
                    rows = self.streams[slot].rows(msg)
                except ValueError as e:
                    self._emit(event_row(self.now_ns(), slot, "protocol_error", error=str(e)))
                    continue
                if rows is not None:
                    self._emit(rows)

    def _control(self, slot: int, m: dict[str, Any]) -> None:
        st = self.procs[slot]
        t = int(m.get("t_ns", self.t0_ns)) - self.t0_ns
        if m["type"] == "hello":
            st.state = "running"
            self._emit(event_row(t, slot, "started", role=st.role, pid=m.get("pid"), core=m.get("core"),
                                 spans_impl=m.get("spans_impl")))
        elif m["type"] == "event":
            name = m.get("name", "event")
            detail = {k: v for k, v in m.items() if k not in ("type", "name", "t_ns")}
            if name == "crashed":
                st.state, st.error = "crashed", str(detail.get("error", "unknown error"))
                self._fail(f"{st.role} crashed: {st.error}")
            elif name == "finished":
                st.state = "finished"
            elif name == "stopped":
                st.state = "stopped"
                if not self.failure and not self._stopping:
                    self._fail(f"{st.role} stopped: {detail.get('reason')}", consequence=True)
            self._emit(event_row(t, slot, name, **detail))

    def _child_exited(self, slot: int) -> None:
        p, st = self._children[slot], self.procs[slot]
        p.join(timeout=1)
        st.exitcode = p.exitcode
        self.proc_sampler.forget(slot)
        # Read what it sent before it died, so its last flushed spans are not lost.
        for conn, s in list(self._conns.items()):
            if s == slot:
                self._drain(conn, limit=10_000)
        if st.state not in ("finished", "crashed", "stopped"):
            if p.exitcode == 0:
                st.state = "finished"
            else:
                st.state = "crashed"
                st.error = _exit_reason(p.exitcode)
                self._fail(f"{st.role} (pid {st.pid}) {st.error}")
        self._emit(event_row(self.now_ns(), slot, "exited", exitcode=p.exitcode, state=st.state, error=st.error))
        if slot == 0:
            self.request_stop("learner ended")  # workers have nothing to do without it
        elif st.state == "crashed" and not self.cfg.keep_going:
            self.request_stop(f"{st.role} crashed")

    def _fail(self, why: str, *, consequence: bool = False) -> None:
        # A worker's death reaches us twice, in either order: the learner's "stopped: worker N is
        # gone" (a consequence) and the worker's own exit status (the cause, with how it died).
        # The cause is what the user must read, whichever arrived first.
        if self.failure is None or (self._failure_is_consequence and not consequence):
            first = self.failure is None
            self.failure = why
            self._failure_is_consequence = consequence
            if first and (not self.cfg.keep_going or why.startswith("learner")):
                self.request_stop(why)

    def _sample(self) -> None:
        self._next_sample = time.monotonic() + 1.0 / self.cfg.sample_hz
        t = self.now_ns()
        self._emit(core_rows(t, self.core_sampler.sample()))
        procs = self.proc_sampler.sample()
        if procs:
            self._emit(proc_rows(t, procs))

    def emit(self, batch: pa.RecordBatch) -> None:
        """Add rows of our own (SCHEMA) to the run: recorded, passed to listeners, returned by pump."""
        self._emit(batch)

    def _emit(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)

    def _deliver(self) -> None:
        """Hand the rows that came in since the last call to the listeners and the writer as ONE
        batch. Their cost is mostly per call (a dozen Arrow kernels, ~0.1 ms each, in Metrics and
        in the writer), so one call per pump instead of one per telemetry frame and per system
        sample (with the 0.25 s flush) cut the monitor's busy time by about 40%: time the run's
        own processes would have lost on a machine they fill (docs/benchmarks.md)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            batch = pending[0]
        else:
            combined = pa.Table.from_batches(pending, schema=SCHEMA).combine_chunks().to_batches()
            if not combined:  # only empty batches
                return
            batch = combined[0]
        self._out.append(batch)
        for fn in self.listeners:
            fn(batch)
        if self.writer is not None and self.writer.failed is None:
            try:
                self.writer.append(batch)
            except RecordingError as e:
                # Disk full or alike: a run nobody records is not worth the user's time.
                self._fail(str(e))

    # -- stopping --------------------------------------------------------------------------
    def request_stop(self, reason: str = "stopped by user") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._stop is not None and not self._stopping:
            self._stopping = True
            try:
                self._stop.send_bytes(b"stop")
            except OSError:
                pass  # the learner is gone already

    def finish(self, grace_s: float = STOP_GRACE_S) -> list[pa.RecordBatch]:
        """Stop the run (if it still runs), wait for the children, close the recording."""
        self.request_stop()
        out: list[pa.RecordBatch] = []
        deadline = time.monotonic() + grace_s
        while self.alive and time.monotonic() < deadline:
            out += self.pump(0.1)
        out += self.kill_children()
        self._out = out
        for hook in self.hooks:
            hook(True)
        self._deliver()
        if self.writer is not None:
            end = self.writer.close(t_ns=self.now_ns(), detail={"stop_reason": self.stop_reason, "failure": self.failure})
            if end is not None:  # listeners (Metrics) see the recording complete, as a reader of the file would
                for listener in self.listeners:
                    listener(end)
                out.append(end)
        return out

    def kill_children(self) -> list[pa.RecordBatch]:
        """Terminate, then kill, whatever is still running; nothing may outlive the run."""
        out: list[pa.RecordBatch] = []
        for sig_method in ("terminate", "kill"):
            left = [p for p in self._children.values() if p.is_alive()]
            if not left:
                break
            for p in left:
                getattr(p, sig_method)()
            for p in left:
                p.join(timeout=2)
        for slot, p in self._children.items():
            if self.procs[slot].exitcode is None and not p.is_alive():
                out += self._collect_exit(slot)
        self._out = []
        self._deliver()  # rows of a pump that a forced stop (second Ctrl-C) cut short
        return out + self._out

    def _collect_exit(self, slot: int) -> list[pa.RecordBatch]:
        self._out = []
        self._child_exited(slot)
        self._deliver()
        return self._out

    @property
    def recording_bytes(self) -> int:
        try:
            return self.record_path.stat().st_size
        except OSError:
            return 0
