"""What every child process of a run does first, and the learner and worker loops.

Children die with the monitor (parent-death signal), ignore Ctrl-C, SIGTERM and SIGHUP (the
monitor decides how a run stops), use one torch thread and are pinned to their core where the OS allows it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from marlwatch import instrument
from marlwatch.lifecycle import STOP_SIGNALS
from marlwatch.workers import PipeWorkerPool, WorkerLost, WorkerPool, report_crash, serve_rollout

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    """Everything a child needs, picklable: it goes to the fork server (marlwatch.forkserver)."""

    role: str  # "learner" or "worker"
    slot: int  # 0 for the learner, 1..W for workers
    core: int | None
    algorithm: Any  # algorithms.base.AlgorithmSpec: names the module the child imports
    config: Any
    iterations: int | None
    spans: bool
    spans_ab: int = 0  # > 0: spans on and off in alternating blocks of this many iterations
    keep_going: bool = False
    monitor_pid: int = field(default_factory=os.getpid)  # made in the monitor: its pid
    # The Ray backend (marlwatch.ray_workers): the learner's workers are Ray actors, which reach
    # the monitor's listener at `monitor_address` with `authkey` (hex).
    backend: str = "local"
    ray_address: str | None = None  # None: a local Ray instance, started and stopped by the learner
    workers: int = 0
    monitor_address: str = ""
    authkey: str = ""
    ray_tmpdir: str | None = None  # a local Ray instance's folder (sessions, sockets, logs): the launcher's


def _die_with_parent(monitor_pid: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the monitor's own clean-up still ends children
    # The parent is the run's fork server (marlwatch.forkserver, which ends with the monitor),
    # or the monitor for a child started another way. The signal only comes for a death after
    # the prctl: a parent that died while this child was starting has left it with another.
    server = sys.modules.get("marlwatch.forkserver")
    if os.getppid() != (server.SERVER_PID if server is not None else monitor_pid):
        os._exit(1)


def _bootstrap(spec: ChildSpec, telemetry_conn: Connection) -> None:
    sys.excepthook = sys.__excepthook__  # the fork server's is silent (marlwatch.forkserver)
    _die_with_parent(spec.monitor_pid)
    # Ctrl-C, a SIGTERM to the whole process group (`timeout`, systemd, a job scheduler) and a
    # closed terminal reach the children too: the monitor decides how the run stops (through the
    # stop pipe, so every span is flushed), not each child on its own.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Started with them blocked (BuiltinLauncher._spawn): unblock them now that they are ignored,
    # so that one pending from the spawn is dropped rather than kept pending for the process's life.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if spec.backend == "ray":
        # Its own process group, which the Ray processes it starts join: the launcher ends the
        # group, so nothing of a local Ray instance outlives the run (docs/distributed.md).
        os.setpgid(0, 0)
    if spec.core is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {spec.core})
        except OSError:
            pass
    import torch

    torch.set_num_threads(1)
    instrument.connect(
        telemetry_conn, spans_enabled=spec.spans, role=spec.role, slot=spec.slot, pid=os.getpid(), core=spec.core
    )


def _make_pool(spec: ChildSpec, worker_conns: list[Connection]) -> WorkerPool:
    if spec.backend == "ray":
        if spec.ray_address is None:
            # The Ray instance the learner starts listens on this machine's loopback address only
            # (Ray's setting for one-machine use, read when ray is imported), not on its network.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if spec.ray_tmpdir is not None:
            # Not the shared /tmp/ray (another user's may be there): a private folder, removed after.
            os.environ["RAY_TMPDIR"] = spec.ray_tmpdir
        from marlwatch.ray_workers import RayWorkerPool

        return RayWorkerPool(spec, keep_going=spec.keep_going)
    return PipeWorkerPool(worker_conns, keep_going=spec.keep_going)


def learner_main(spec: ChildSpec, telemetry_conn: Connection, worker_conns: list[Connection],
                 stop: Connection) -> None:
    _bootstrap(spec, telemetry_conn)
    exit_code = 0
    pool: WorkerPool | None = None
    try:
        pool = _make_pool(spec, worker_conns)
        learner = spec.algorithm.learner_cls(spec.config)
        span = instrument.span
        done = 0
        while (spec.iterations is None or done < spec.iterations) and not stop.poll():
            spans_on = None
            if spec.spans_ab and spec.spans:
                # Overhead A/B inside one run: both halves see the same machine, moment by moment.
                spans_on = (done // spec.spans_ab) % 2 == 0
                instrument.telemetry().spans_enabled = spans_on
            with span("sync/broadcast"):
                pool.broadcast(learner.weights(), spans=spans_on)
            with span("sync/gather"):
                payloads = pool.gather()
            with span("update"):
                stats = learner.update(payloads)
            for name, value in stats.items():
                instrument.gauge(name, value)
            instrument.tick()
            done += 1
        instrument.telemetry().event("finished", iterations=done)
    except WorkerLost as e:
        instrument.telemetry().event("stopped", reason=str(e))
        exit_code = 3
    except BaseException as e:  # noqa: BLE001 - reported to the monitor, then the process ends
        report_crash(e)
        exit_code = 1
    finally:
        if pool is not None:
            pool.stop()
        instrument.telemetry().close()
    sys.exit(exit_code)


def worker_main(spec: ChildSpec, telemetry_conn: Connection, learner_conn: Connection) -> None:
    _bootstrap(spec, telemetry_conn)
    exit_code = 0
    try:
        rollout = spec.algorithm.rollout_cls(spec.config, spec.slot - 1)
        served = serve_rollout(rollout, learner_conn)
        instrument.telemetry().event("finished", iterations=served)
    except BaseException as e:  # noqa: BLE001 - reported to the monitor, then the process ends
        report_crash(e)
        exit_code = 1
    finally:
        instrument.telemetry().close()
    sys.exit(exit_code)
