"""The worker interface: how a learner reaches its rollout workers.

`WorkerPool` is what the learner loop uses; `PipeWorkerPool` reaches local worker processes
over `multiprocessing` pipes; `marlwatch.ray_workers.RayWorkerPool` reaches Ray actors with
the same three methods (broadcast, gather, stop), and its actors do the same round
(`rollout_round`) with the same phases. `report_crash`: how a learner or worker tells the monitor it
crashed.
"""

from __future__ import annotations

import os
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from marlwatch import instrument

STOP = ("stop",)


class WorkerLost(RuntimeError):
    """A worker went away mid-run (crashed or killed)."""


class WorkerPool(Protocol):
    def broadcast(self, weights: Any, *, spans: bool | None = None) -> None:
        """Send the latest weights; `spans` (when not None) switches the workers' spans on or off."""
        ...

    def gather(self) -> list[Any]: ...

    def stop(self) -> None: ...


class PipeWorkerPool:
    """Local worker processes, one duplex pipe each. With `keep_going`, a lost worker is
    dropped and the run goes on with the others; without it, losing one ends the run."""

    def __init__(self, conns: list[Connection], *, keep_going: bool = False) -> None:
        self.conns = list(conns)
        self.alive = list(range(len(conns)))
        self.keep_going = keep_going

    def _lose(self, index: int, why: str) -> None:
        self.alive.remove(index)
        if not self.keep_going or not self.alive:
            raise WorkerLost(f"worker {index + 1} {why}")

    def broadcast(self, weights: Any, *, spans: bool | None = None) -> None:
        for i in list(self.alive):
            try:
                self.conns[i].send(("weights", weights, spans))
            except (BrokenPipeError, EOFError, OSError):
                self._lose(i, "is gone (pipe closed)")

    def gather(self) -> list[Any]:
        pending = {self.conns[i]: i for i in self.alive}
        payloads: list[Any] = []
        while pending:
            for conn in wait(list(pending)):
                i = pending.pop(conn)  # type: ignore[call-overload]
                try:
                    _, payload = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError, ConnectionResetError):
                    self._lose(i, "is gone (pipe closed)")
                    continue
                payloads.append(payload)
        return payloads

    def stop(self) -> None:
        for i in self.alive:
            try:
                self.conns[i].send(STOP)
            except (BrokenPipeError, EOFError, OSError):
                pass


def report_crash(exc: BaseException, *, close: bool = True) -> None:
    """Tell the monitor this process crashed, and where (one line)."""
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" ({os.path.basename(where.filename)}:{where.lineno})" if where else ""
    instrument.telemetry().event("crashed", error=last + at)
    if close:
        instrument.telemetry().close()


def serve_rollout(rollout: Any, conn: Connection) -> int:
    """The worker loop: wait for weights, collect, send; one tick per round. Returns rounds."""
    span = instrument.span
    rounds = 0
    while True:
        with span("sync/wait"):
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return rounds  # the learner is gone: nothing left to do
        if msg[0] == "stop":
            return rounds
        payload = rollout_round(rollout, msg[1], msg[2])
        with span("sync/send"):
            try:
                conn.send(("batch", payload))
            except OSError:  # BrokenPipeError: the learner ended (stopped, or lost another worker) meanwhile
                return rounds
        instrument.tick()
        rounds += 1


def rollout_round(rollout: Any, weights: Any, spans: bool | None) -> Any:
    """One round of a worker, whatever carries the weights and the results: load, collect."""
    if spans is not None:  # the learner's spans A/B switch (benchmarking the overhead)
        instrument.telemetry().spans_enabled = spans
    with instrument.span("sync/load_weights"):
        rollout.load_weights(weights)
    with instrument.span("sample"):
        return rollout.collect()
