"""The monitor: telemetry connections in; one recording and the live listeners out.

It knows nothing of algorithms, commands or Ray. A launcher reserves a process slot for each
process it starts and attaches that process's telemetry pipe; a process started anywhere else
connects to the monitor's listener (an authenticated `multiprocessing.connection` socket) at any
moment and gets a slot from its hello. Every row goes through `emit`: once per `pump` the rows
are handed, as ONE Arrow batch, to the listeners (Metrics, flame) and to the recording, so the
live view and a replay of the file read exactly the same rows.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing import connection as mpc
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import pyarrow as pa

from marlwatch import wire
from marlwatch.collector import ProcStream, core_rows, event_row, proc_rows
from marlwatch.recording import SCHEMA, RecordingError, RecordingWriter, RunInfo
from marlwatch.sysstats import CoreSampler, ProcSampler

HANDSHAKE_TIMEOUT_S = 5.0
MAX_SLOTS = 1024  # a bound on what connecting processes can make the monitor (and every reader) hold


@dataclass
class ProcState:
    """One process slot, as the monitor knows it (Metrics rebuilds the same from the recording)."""

    slot: int
    role: str
    pid: int | None = None
    core: int | None = None
    # starting, running, finished, crashed, stopped; for processes that are not the launcher's own
    # children: left (closed its connection), exited (gone, exit status unknown)
    state: str = "starting"
    error: str | None = None
    exitcode: int | None = None

    @property
    def ended(self) -> bool:
        return self.state in ("finished", "crashed", "stopped", "left", "exited")


# What a process's hello or event may make of its slot: the events the span API sends.
_EVENT_STATES = {"crashed": "crashed", "finished": "finished", "stopped": "stopped"}


class Address:
    """Where a listener listens: ``unix:/path`` or ``HOST:PORT`` (the MARLWATCH_ADDRESS format)."""

    def __init__(self, text: str) -> None:
        self.text = text
        if text.startswith("unix:"):
            if not text[5:]:
                raise ValueError("unix: address needs a path")
            self.family, self.value = "AF_UNIX", text[5:]
        else:
            host, sep, port = text.rpartition(":")
            if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ValueError(f"address must be HOST:PORT or unix:PATH, got {text!r}")
            self.family, self.value = "AF_INET", (host.strip("[]") or "127.0.0.1", int(port))

    @property
    def is_local(self) -> bool:
        if self.family == "AF_UNIX":
            return True
        host = self.value[0]
        try:
            return all(info[4][0].startswith("127.") or info[4][0] == "::1"
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False

    @staticmethod
    def format(raw: Any) -> str:
        if isinstance(raw, str):
            return f"unix:{raw}"
        return f"{raw[0]}:{raw[1]}"


class _Acceptor:
    """Accepts connections on a thread and authenticates each on a thread of its own, so that a
    client that connects and then says nothing never stops another from connecting. Accepted
    connections are queued for the pumping thread, which is woken through a pipe."""

    def __init__(self, address: Address, authkey: bytes) -> None:
        # authkey=None: the handshake is ours (below), per connection, off the accepting thread.
        self.listener = mpc.Listener(address.value, family=address.family, backlog=64)
        self.address = Address.format(self.listener.address)
        self.authkey = authkey
        self.accepted: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.wake_r, self._wake_w = mpc.Pipe(duplex=False)
        self.closed = False
        threading.Thread(target=self._accept_loop, name="marlwatch-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn = self.listener.accept()
            except OSError:
                if self.closed:
                    return
                continue
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn: Connection) -> None:
        # Mutual authentication, exactly what Listener(authkey=...).accept() does, in this thread.
        timer = threading.Timer(HANDSHAKE_TIMEOUT_S, _shutdown, args=(conn,))
        timer.start()
        try:
            mpc.deliver_challenge(conn, self.authkey)
            mpc.answer_challenge(conn, self.authkey)
        except (mpc.AuthenticationError, EOFError, OSError, ValueError) as e:
            timer.cancel()
            reason = "wrong key" if isinstance(e, mpc.AuthenticationError) else f"handshake failed ({e or type(e).__name__})"
            with contextlib.suppress(OSError):
                conn.close()
            self._post(("refused", reason))
            return
        timer.cancel()
        self._post(("accepted", conn))

    def _post(self, item: tuple[str, Any]) -> None:
        self.accepted.put(item)
        with contextlib.suppress(OSError):
            self._wake_w.send_bytes(b"!")

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        if self.address.startswith("unix:"):
            with contextlib.suppress(OSError):
                os.unlink(self.address[5:])


def _shutdown(conn: Connection) -> None:
    # Unblocks a handshake stuck in recv (a client that connected and went silent).
    with contextlib.suppress(OSError, ValueError):
        socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)


class Monitor:
    """Owns telemetry connections, process slots, the system samplers and the recording."""

    def __init__(self, info: RunInfo, record_path: Path, *, sample_hz: float = 10.0) -> None:
        self.info = info
        self.record_path = Path(record_path)
        self.sample_hz = sample_hz
        self.procs: dict[int, ProcState] = {}
        self.streams: dict[int, ProcStream] = {}
        self.listeners: list[Callable[[pa.RecordBatch], None]] = []
        # Called with final=False at the end of every pump and with final=True before the recording
        # closes: lets a helper (marlwatch.flame) act in the pumping thread.
        self.hooks: list[Callable[[bool], None]] = []
        # Process events that decide a run's fate (crashed, stopped, left): the session's policy.
        self.on_process_event: Callable[[ProcState, str, dict[str, Any]], None] | None = None
        self.writer: RecordingWriter | None = None
        self.t0_ns = time.perf_counter_ns()
        self._conns: dict[Connection, int] = {}
        self._sockets: set[Connection] = set()  # connections from the listener, not our own pipes
        self._hello_pending: set[Connection] = set()
        self._slot_by_pid: dict[int, int] = {}
        self._acceptor: _Acceptor | None = None
        self.core_sampler = CoreSampler()
        self.proc_sampler = ProcSampler()
        self._next_sample = 0.0
        self._pending: list[pa.RecordBatch] = []
        self.write_failure: str | None = None
        self.spans_received = 0

    # -- set-up ----------------------------------------------------------------------------
    def open(self, *, overwrite: bool = False, unique: bool = False) -> None:
        """Create the recording (raises RecordingError before anything else starts); with `unique`
        (a default name) the first free one of the name, -2, -3, ..."""
        self.writer = RecordingWriter(self.record_path, self.info, overwrite=overwrite, unique=unique)
        self.record_path = self.writer.path
        self.t0_ns = time.perf_counter_ns()

    def listen(self, address: str, authkey: bytes) -> str:
        """Accept telemetry connections on `address` from now on; returns the bound address
        (``unix:PATH`` or ``HOST:PORT``, port resolved). Raises OSError/ValueError if it cannot."""
        self._acceptor = _Acceptor(Address(address), authkey)
        return self._acceptor.address

    @property
    def address(self) -> str | None:
        return self._acceptor.address if self._acceptor else None

    @property
    def authkey(self) -> bytes | None:
        return self._acceptor.authkey if self._acceptor else None

    def add_process(self, role: str, *, pid: int | None = None, core: int | None = None) -> int:
        """A slot for a process (reserved by a launcher before it starts, or found by the monitor).
        Slots are numbered in order; the first is the run's main process (its ticks are the IPS)."""
        slot = len(self.procs)
        self.procs[slot] = ProcState(slot, role, pid=pid, core=core)
        self.streams[slot] = ProcStream(slot, self.t0_ns)
        if pid is not None:
            self.set_pid(slot, pid)
        return slot

    def set_pid(self, slot: int, pid: int) -> None:
        self.procs[slot].pid = pid
        self._slot_by_pid[pid] = slot
        self.proc_sampler.watch(slot, pid)

    def slot_for_pid(self, pid: int) -> int | None:
        return self._slot_by_pid.get(pid)

    def attach(self, slot: int, conn: Connection) -> None:
        """`conn` carries the telemetry of the process in `slot` (a pipe from a launched child)."""
        self._conns[conn] = slot

    def now_ns(self) -> int:
        return time.perf_counter_ns() - self.t0_ns

    @property
    def connected(self) -> bool:
        return bool(self._conns) or bool(self._hello_pending)

    # -- pumping ---------------------------------------------------------------------------
    def pump(self, timeout: float, waitables: Iterable[Any] = ()) -> list[Any]:
        """Read whatever arrives within `timeout` s (returning early when one of `waitables`, a
        launcher's process sentinels, becomes ready); record it. Returns the ready waitables."""
        extra = list(waitables)
        deadline = time.monotonic() + timeout
        woke: list[Any] = []
        while True:
            remaining = max(0.0, min(deadline - time.monotonic(), self._next_sample - time.monotonic()))
            watch = [*self._conns, *self._hello_pending, *extra]
            if self._acceptor is not None:
                watch.append(self._acceptor.wake_r)
            ready = wait(watch, remaining) if watch else []
            if not watch:
                time.sleep(remaining)
            for obj in ready:
                if obj in self._conns:
                    self.drain(obj)
                elif obj in self._hello_pending:
                    self._greet(obj)
                elif self._acceptor is not None and obj is self._acceptor.wake_r:
                    self._take_accepted()
                else:
                    woke.append(obj)
            if time.monotonic() >= self._next_sample:
                self._sample()
            if woke or time.monotonic() >= deadline:
                break
        return woke

    def _take_accepted(self) -> None:
        assert self._acceptor is not None
        with contextlib.suppress(OSError, EOFError):
            while self._acceptor.wake_r.poll():
                self._acceptor.wake_r.recv_bytes()
        while True:
            try:
                what, item = self._acceptor.accepted.get_nowait()
            except queue.Empty:
                return
            if what == "accepted":
                self._hello_pending.add(item)
            else:
                self.emit(event_row(self.now_ns(), None, "connection_refused", reason=item))
                self._notice(f"a connection was refused: {item}")

    def _greet(self, conn: Connection) -> None:
        """The first frame of a socket connection must be a hello; it names the process's slot."""
        self._hello_pending.discard(conn)
        try:
            msg = wire.decode(conn.recv_bytes(wire.MAX_FRAME))
            if not (isinstance(msg, wire.Control) and msg.message.get("type") == "hello"):
                raise wire.ProtocolError("the first frame was not a hello")
        except (EOFError, OSError, wire.ProtocolError) as e:
            with contextlib.suppress(OSError):
                conn.close()
            self.emit(event_row(self.now_ns(), None, "connection_dropped", reason=str(e) or type(e).__name__))
            self._notice(f"a connection was dropped: {e or type(e).__name__}")
            return
        hello = msg.message
        pid = hello.get("pid") if isinstance(hello.get("pid"), int) else None
        slot = self.slot_for_pid(pid) if pid is not None else None
        if slot is None or (self.procs[slot].state == "running" and any(s == slot for s in self._conns.values())):
            if len(self.procs) >= MAX_SLOTS:
                conn.close()
                self.emit(event_row(self.now_ns(), None, "connection_dropped", reason="too many processes"))
                return
            slot = self.add_process(_role_of(hello), pid=pid)
        elif self.procs[slot].role.startswith("pid "):  # found by the process watch: now it has a name
            self.procs[slot].role = _role_of(hello)
        self._conns[conn] = slot
        self._sockets.add(conn)
        self._control(slot, hello)

    def drain(self, conn: Connection, limit: int = 64) -> None:
        slot = self._conns[conn]
        for _ in range(limit):
            try:
                if not conn.poll():
                    return
                frame = conn.recv_bytes(wire.MAX_FRAME)
            except (EOFError, OSError):
                self._disconnected(conn, slot)
                return
            try:
                msg = wire.decode(frame)
                if isinstance(msg, wire.Control):
                    self._control(slot, msg.message)
                    continue
                rows = self.streams[slot].rows(msg)
            except (wire.ProtocolError, ValueError) as e:
                self.emit(event_row(self.now_ns(), slot, "protocol_error", error=str(e)))
                if conn in self._sockets:
                    # A socket that sent one bad frame cannot be trusted to be in step: drop it,
                    # keep what it sent before, and every other process's data.
                    self._notice(f"{self.procs[slot].role}: bad telemetry, connection dropped ({e})")
                    self._disconnected(conn, slot)
                    return
                continue
            if rows is not None:
                self.emit(rows)

    def _disconnected(self, conn: Connection, slot: int) -> None:
        del self._conns[conn]
        with contextlib.suppress(OSError):
            conn.close()
        if conn in self._sockets:
            self._sockets.discard(conn)
            st = self.procs[slot]
            if not st.ended and not any(s == slot for s in self._conns.values()):
                # A process that connected by itself has no exit status for us: it left.
                st.state = "left"
                self.emit(event_row(self.now_ns(), slot, "left", role=st.role))
                if self.on_process_event is not None:
                    self.on_process_event(st, "left", {})

    def _control(self, slot: int, m: dict[str, Any]) -> None:
        st = self.procs[slot]
        t_raw = m.get("t_ns")
        t = (t_raw - self.t0_ns) if isinstance(t_raw, int) else self.now_ns()
        kind = m.get("type")
        if kind == "hello":
            st.state = "running"
            if isinstance(m.get("pid"), int) and st.pid is None:
                self.set_pid(slot, m["pid"])
            if isinstance(m.get("core"), int):
                st.core = m["core"]
            detail = {k: m.get(k) for k in ("pid", "core", "spans_impl", "argv", "ppid", "auto_phases") if k in m}
            self.emit(event_row(t, slot, "started", role=st.role, **detail))
        elif kind == "event":
            name = str(m.get("name", "event"))
            detail = {k: v for k, v in m.items() if k not in ("type", "name", "t_ns")}
            if name in _EVENT_STATES:
                st.state = _EVENT_STATES[name]
                if name == "crashed":
                    st.error = str(detail.get("error", "unknown error"))
            self.emit(event_row(t, slot, name, **detail))
            if self.on_process_event is not None:
                self.on_process_event(st, name, detail)

    def process_exited(self, slot: int, exitcode: int | None, *, error: str | None = None) -> None:
        """A launcher's report that the process in `slot` ended; reads what it sent before it died."""
        st = self.procs[slot]
        st.exitcode = exitcode
        self.proc_sampler.forget(slot)
        for conn, s in list(self._conns.items()):
            if s == slot:
                self.drain(conn, limit=10_000)
        if not st.ended or st.state == "left":
            if exitcode == 0:
                st.state = "finished"
            elif exitcode is None:
                st.state = "exited"  # not our child: gone, with a status only its parent saw
            else:
                st.state, st.error = "crashed", error
        self.emit(event_row(self.now_ns(), slot, "exited", exitcode=exitcode, state=st.state, error=st.error))
        if self.on_process_event is not None:
            self.on_process_event(st, "exited", {"exitcode": exitcode})

    def _sample(self) -> None:
        self._next_sample = time.monotonic() + 1.0 / self.sample_hz
        t = self.now_ns()
        self.emit(core_rows(t, self.core_sampler.sample()))
        procs = self.proc_sampler.sample()
        if procs:
            self.emit(proc_rows(t, procs))

    def _notice(self, text: str) -> None:
        self.emit(event_row(self.now_ns(), None, "notice", text=text))

    # -- rows out --------------------------------------------------------------------------
    def emit(self, batch: pa.RecordBatch) -> None:
        """Add rows (SCHEMA) to the run: recorded and passed to listeners at the next `deliver`."""
        self._pending.append(batch)

    def deliver(self) -> None:
        """Hand the rows that came in since the last call to the listeners and the writer as ONE
        batch: their cost is mostly per call (a dozen Arrow kernels in Metrics and the writer), so
        one call per pump instead of one per frame cut the monitor's busy time by about 40%."""
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
        for fn in self.listeners:
            fn(batch)
        if self.writer is not None and self.writer.failed is None:
            try:
                self.writer.append(batch)
            except RecordingError as e:
                self.write_failure = str(e)

    def run_hooks(self, final: bool) -> None:
        for hook in self.hooks:
            hook(final)
        self.deliver()

    def close(self, detail: dict[str, Any]) -> None:
        """Close every connection and the recording (with its end marker, which listeners see too)."""
        if self._acceptor is not None:
            self._acceptor.close()
        for conn in [*self._conns, *self._hello_pending]:
            with contextlib.suppress(OSError):
                conn.close()
        self._conns.clear()
        self._hello_pending.clear()
        self.deliver()
        if self.writer is not None:
            end = self.writer.close(t_ns=self.now_ns(), detail=detail)
            if end is not None:  # listeners (Metrics) see the recording complete, as a reader of the file would
                for listener in self.listeners:
                    listener(end)

    @property
    def recording_bytes(self) -> int:
        try:
            return self.record_path.stat().st_size
        except OSError:
            return 0


def _role_of(hello: dict[str, Any]) -> str:
    role = hello.get("role")
    if isinstance(role, str) and role.strip():
        return role.strip()[:60]
    return f"pid {hello.get('pid', '?')}"
