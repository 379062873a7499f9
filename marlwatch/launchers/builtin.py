"""The built-in algorithms in local processes: a learner and W rollout workers, forked from a
fork server that has imported torch once (marlwatch/forkserver.py) and pinned one per core, their
telemetry on pipes (the children's side is marlwatch/process.py)."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import threading
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import Any

from marlwatch import lifecycle
from marlwatch.launchers import StartFailed, exit_reason
from marlwatch.limits import check_machine
from marlwatch.monitor import Monitor
from marlwatch.process import ChildSpec, learner_main, worker_main
from marlwatch.recording import RunInfo

# What usually lies behind an OSError from creating a process or a pipe, for the user to act on.
_LIMITS = {errno.EAGAIN: "is the limit on processes, ulimit -u or a cgroup's pids.max, reached?",
           errno.EMFILE: "is the limit on open files, ulimit -n, reached?",
           errno.ENOMEM: "is the memory full?"}


def os_reason(e: OSError) -> str:
    hint = _LIMITS.get(e.errno) if e.errno is not None else None
    return (e.strerror or str(e)) + (f" ({hint})" if hint else "")


def _why_no_fork() -> OSError:
    """Why the fork server died starting a child, which multiprocessing does not pass on (the
    monitor only reads the end of its pipe): fork once here, and say what stops that (a limit on
    processes, usually), or that the server ended."""
    try:
        pid = os.fork()  # the child only exits: safe beside the monitor's threads
    except OSError as e:
        return e
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return OSError(None, "the fork server ended while starting it")


class BuiltinLauncher:
    def __init__(self, cfg: Any, algorithm: Any = None) -> None:
        """`cfg` is a RunConfig; `algorithm` overrides the registry lookup of `cfg.algo`."""
        from algorithms import get_algorithm, make_config

        self.cfg = cfg
        self.spec = algorithm or get_algorithm(cfg.algo)  # raises KeyError with a message
        self.workers = cfg.resolved_workers()
        self.algo_config = make_config(self.spec, env=cfg.env, agents=cfg.agents, workers=self.workers,
                                       seed=cfg.seed, settings=cfg.settings)
        if not cfg.ignore_limits:  # memory and processes vs this machine: LimitError, a ValueError
            check_machine(self.algo_config, self.workers, cfg.iterations)
        cores = os.cpu_count() or 1
        can_pin = hasattr(os, "sched_setaffinity")
        # The learner takes core 0; workers spread over the cores after it, wrapping around.
        self.pinning: dict[int, int | None] = {0: 0 if can_pin else None}
        for w in range(1, self.workers + 1):
            self.pinning[w] = (w % cores) if can_pin else None
        self.roles = {0: "learner", **{w: f"worker {w}" for w in range(1, self.workers + 1)}}
        self._children: dict[int, mp.process.BaseProcess] = {}
        self._stop: Connection | None = None  # the monitor's end of the learner's stop pipe
        self._stop_reason: str | None = None
        self._stop_sent = False
        self._starting = ""  # what is being started, for the message when it cannot be

    def run_info(self) -> RunInfo:
        cfg = self.cfg
        return RunInfo(
            algo=cfg.algo, env=self.algo_config.env, agents=cfg.agents, workers=self.workers, seed=cfg.seed,
            iterations=cfg.iterations, spans=cfg.spans,
            pinning={str(k): v for k, v in self.pinning.items()},
            procs={str(k): r for k, r in self.roles.items()},
            extra={"settings": cfg.settings,
                   "config": {k: v for k, v in vars(self.algo_config).items() if isinstance(v, int | float | str | bool)},
                   **({"spans_ab": cfg.spans_ab} if cfg.spans_ab else {})},
        )

    def record_stem(self) -> str:
        return self.cfg.algo

    def describe(self) -> str:
        w = self.workers
        return f"{self.cfg.algo} on {self.algo_config.env}, {self.cfg.agents} agents, {w} worker{'s' * (w != 1)}"

    # -- starting --------------------------------------------------------------------------
    def start(self, monitor: Monitor) -> None:
        for slot, role in self.roles.items():
            monitor.add_process(role, core=self.pinning[slot])
        self._start_children(monitor)

    def _start_children(self, monitor: Monitor) -> None:
        """Start the processes, and say which could not start and why (StartFailed)."""
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["marlwatch.forkserver"])  # torch once, not once per child
        child_ends: list[Connection] = []  # the children's ends of the pipes, and the learner's data ends
        self._starting = "the resource tracker"
        try:
            # Spawning starts multiprocessing's resource tracker on first use, and that code unblocks
            # SIGINT on its way out: inside _spawn's window, the child would then start unprotected.
            # Started here, out of the window, it is not started again in there.
            resource_tracker.ensure_running()
            # A pipe, not an Event: no semaphore, no resource-tracker process, and the learner also
            # stops when the monitor dies (the pipe reads EOF).
            stop_r, self._stop = ctx.Pipe(duplex=False)
            child_ends.append(stop_r)
            self._spawn_all(monitor, ctx, stop_r, child_ends)
        except OSError as e:
            raise StartFailed(f"cannot start {self._starting}: {os_reason(e)}") from None
        finally:
            # Our copies of the children's pipe ends must go, or a dead child's pipe never reads EOF.
            for c in child_ends:
                c.close()
        if self._stop_reason is not None:
            # A stop asked for before the stop pipe existed (a Ctrl-C delivered when starting the
            # resource tracker unblocked SIGINT, say) had nothing to send on: send it now.
            self.request_stop(self._stop_reason)

    def _spawn_all(self, monitor: Monitor, ctx: Any, stop_r: Connection, child_ends: list[Connection]) -> None:
        """The workers, then the learner (with their data pipes); `child_ends` are closed after."""
        learner_data: list[Connection] = []
        for w in range(1, self.workers + 1):
            self._starting = f"worker {w}"
            tel_r, tel_w = ctx.Pipe(duplex=False)
            child_ends.append(tel_w)
            monitor.attach(w, tel_r)  # the monitor's to close from here on, whatever happens
            a, b = ctx.Pipe(duplex=True)
            learner_data.append(a)
            child_ends += [a, b]
            p = ctx.Process(target=worker_main, name=f"marlwatch-worker-{w}",
                            args=(self._child_spec("worker", w), tel_w, b), daemon=True)
            self._spawn(monitor, w, p)
        self._starting = "the learner"
        tel_r, tel_w = ctx.Pipe(duplex=False)
        child_ends.append(tel_w)
        monitor.attach(0, tel_r)
        p = ctx.Process(target=learner_main, name="marlwatch-learner",
                        args=(self._child_spec("learner", 0), tel_w, learner_data, stop_r), daemon=True)
        self._spawn(monitor, 0, p)

    def _child_spec(self, role: str, slot: int) -> ChildSpec:
        cfg = self.cfg
        return ChildSpec(role=role, slot=slot, core=self.pinning[slot], algorithm=self.spec, config=self.algo_config,
                         iterations=cfg.iterations, spans=cfg.spans, keep_going=cfg.keep_going, spans_ab=cfg.spans_ab)

    def _spawn(self, monitor: Monitor, slot: int, p: mp.process.BaseProcess) -> None:
        # A child takes a while before its bootstrap ignores SIGINT (a spawned one imported torch
        # first); a Ctrl-C to the terminal's process group then killed it with KeyboardInterrupt
        # and the run reported a crash. So the child starts with SIGINT blocked: the signal mask
        # survives fork and exec, a blocked SIGINT stays pending, and the child's bootstrap ignores
        # it before unblocking. The fork server is started by the first start() here, so it has
        # the mask too, and every child forked from it.
        # The monitor only blocks it in this thread, and keeps its own handler meanwhile: a Ctrl-C
        # in the window goes to another of its threads or waits for the unblock, handled either way.
        main = threading.current_thread() is threading.main_thread()
        if main:  # the live app spawns from its worker thread: it cannot touch signals, nor needs to
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, lifecycle.STOP_SIGNALS)
        try:
            p.start()
        except EOFError:
            raise _why_no_fork() from None
        finally:
            if main:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self._children[slot] = p
        monitor.set_pid(slot, p.pid)  # type: ignore[arg-type]

    # -- running ---------------------------------------------------------------------------
    def waitables(self) -> list[Any]:
        return [p.sentinel for p in self._children.values() if p.exitcode is None]

    def poll(self, monitor: Monitor, ready: list[Any]) -> None:
        if self._stop_reason is not None:
            self._end_unconnected(monitor)
        for slot, p in self._children.items():
            if monitor.procs[slot].exitcode is None and not p.is_alive():
                p.join(timeout=1)
                monitor.process_exited(slot, p.exitcode, error=exit_reason(p.exitcode))

    def _end_unconnected(self, monitor: Monitor) -> None:
        # A stop asked while a child still starts (importing torch: seconds, tens of seconds on a
        # loaded machine) would wait for its start-up, and then for its first iteration. It has
        # sent nothing yet, so there is nothing to flush: it ends now, stopped by us, not crashed.
        for slot, p in self._children.items():
            st = monitor.procs[slot]
            if st.state == lifecycle.STARTING and p.is_alive():
                monitor.process_event(slot, "stopped", {"reason": "stopped while starting"})
                p.kill()

    @property
    def running(self) -> bool:
        return any(p.is_alive() for p in self._children.values())

    def request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason
        if self._stop is not None and not self._stop_sent:
            self._stop_sent = True
            try:
                self._stop.send_bytes(b"stop")
            except OSError:
                pass  # the learner is gone already

    def kill(self, monitor: Monitor) -> None:
        if self._stop is not None:
            self._stop.close()
            self._stop = None
        # The children ignore SIGTERM (only the monitor decides when a run stops: a SIGTERM to the
        # whole process group must not kill them mid-write), so the grace period over, SIGKILL.
        left = [p for p in self._children.values() if p.is_alive()]
        for p in left:
            p.kill()
        for p in left:
            p.join(timeout=2)
        self.poll(monitor, [])
