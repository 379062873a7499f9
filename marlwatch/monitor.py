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

from marlwatch import lifecycle, wire
from marlwatch.clock import ClockSync, boot_id
from marlwatch.collector import ProcStream, SystemSamples, event_row
from marlwatch.nodes import Node, Nodes
from marlwatch.recording import RecordingError, RecordingWriter, RunInfo
from marlwatch.schema import one_batch
from marlwatch.sysstats import CoreSampler, ProcSample, ProcSampler

HANDSHAKE_TIMEOUT_S = 5.0
_FRAMES_PER_PASS = 64  # frames one pass of the pump reads, over all connections (at most 6 MB of spans)
_BACKLOG_FRAMES = 256  # frames a connection may send before its clock offset is known
PROC_SAMPLE_HZ = 2.0  # per-process CPU and memory, at most this often (cores: sample_hz)
# Rows are handed to the listeners and the writer in one batch at most every DELIVER_S (sooner
# once DELIVER_ROWS wait, or when asked): each delivery costs about a millisecond whatever it holds.
DELIVER_S = 0.5
DELIVER_ROWS = 1 << 16
MAX_SLOTS = 1024  # a bound on what connecting processes can make the monitor (and every reader) hold


@dataclass
class ProcState:
    """One process slot, as the monitor knows it (Metrics rebuilds the same from the recording)."""

    slot: int
    role: str
    pid: int | None = None
    core: int | None = None
    state: str = lifecycle.STARTING  # marlwatch.lifecycle

    error: str | None = None
    exitcode: int | None = None
    node: str | None = None  # the node's name (a run across machines, docs/distributed.md)
    # False for a process on another machine: no psutil, no py-spy, its clock aligned by estimate
    same_machine: bool = True

    @property
    def ended(self) -> bool:
        return self.state in lifecycle.ENDED

    def on(self, event: str, detail: dict[str, Any]) -> None:
        """Apply lifecycle `event` (marlwatch.lifecycle: the rule Metrics applies to the recording)."""
        self.state, self.error = lifecycle.after(self.state, self.error, event, detail)


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
        self.boot_id = boot_id()
        self.nodes = Nodes(self.core_sampler.cores)
        self._clock: dict[Connection, ClockSync] = {}
        self._backlog: dict[Connection, list[bytes]] = {}  # frames waiting for their clock offset
        self._slot_by_node_pid: dict[tuple[str, int], int] = {}
        self._hello_pids: dict[int, int] = {}  # slot -> pid its process gave (on its own machine)
        self._next_sample = 0.0
        self._next_proc_sample = 0.0
        self.samples = SystemSamples()
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._next_delivery = 0.0
        self.write_failure: str | None = None

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
            # A socket's buffer holds many frames (a pipe's, one): with dozens of sockets, 64 frames
            # each made one pass hold ~0.7 GB of rows before `deliver`. A pass reads a bounded share.
            per_conn = max(1, _FRAMES_PER_PASS // max(1, len(self._conns)))
            for obj in ready:
                if obj in self._conns:
                    if time.monotonic() < deadline or obj is ready[0]:
                        self.drain(obj, limit=per_conn)  # the others are still ready at the next pump
                elif obj in self._hello_pending:
                    self._greet(obj)
                elif self._acceptor is not None and obj is self._acceptor.wake_r:
                    self._take_accepted()
                else:
                    woke.append(obj)
            if time.monotonic() >= self._next_sample:
                self._sample()
            if self._clock:
                self._clock_requests()
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
        clock = hello.get("clock") if isinstance(hello.get("clock"), dict) else None
        # A process without clock information is from an older marlwatch: taken as local, as before.
        same_machine = clock is None or (self.boot_id is not None and clock.get("boot_id") == self.boot_id)
        slot = self.slot_for_pid(pid) if pid is not None and same_machine else None
        if slot is None:
            slot = self._reserved_slot(_role_of(hello))
        if slot is None or (self.procs[slot].state == "running" and any(s == slot for s in self._conns.values())):
            if len(self.procs) >= MAX_SLOTS:
                conn.close()
                self.emit(event_row(self.now_ns(), None, "connection_dropped", reason="too many processes"))
                return
            slot = self.add_process(_role_of(hello))
        elif self.procs[slot].role.startswith("pid "):  # found by the process watch: now it has a name
            self.procs[slot].role = _role_of(hello)
        self.procs[slot].same_machine = same_machine
        if pid is not None:
            self._hello_pids[slot] = pid
        if pid is not None and same_machine and self.procs[slot].pid is None:
            self.set_pid(slot, pid)
        self._conns[conn] = slot
        self._sockets.add(conn)
        if clock is not None and clock.get("v") == 1:
            hello_t = hello.get("t_ns") if isinstance(hello.get("t_ns"), int) else None
            sync = self._clock[conn] = ClockSync(time.perf_counter_ns(), same_clock=same_machine, hello_t_ns=hello_t)
            if not same_machine:
                self._backlog[conn] = []  # its rows wait for the first estimate (a few round trips)
                self._align(slot, sync)
        self._control(slot, hello)

    def _align(self, slot: int, sync: ClockSync) -> None:
        self.streams[slot].t_origin_ns = self.t0_ns + sync.applied_ns

    def _reserved_slot(self, role: str) -> int | None:
        """A slot a launcher reserved for a process that will connect by itself (a Ray actor):
        the first one of that role still waiting."""
        for slot, st in self.procs.items():
            if st.role == role and st.state == "starting" and st.pid is None and \
                    not any(s == slot for s in self._conns.values()):
                return slot
        return None

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
            backlog = self._backlog.get(conn)
            if backlog is not None:
                if self._clock_frame(conn, frame):
                    continue
                backlog.append(frame)  # until the process's clock offset is known
                if len(backlog) >= _BACKLOG_FRAMES:
                    self._settle(conn, slot)
                continue
            if not self._frame(conn, slot, frame):
                return

    def _frame(self, conn: Connection, slot: int, frame: bytes) -> bool:
        """Record one frame; False if the connection was dropped for it."""
        if conn in self._clock and self._clock_frame(conn, frame):
            return True
        try:
            msg = wire.decode(frame)
            if isinstance(msg, wire.Control):
                self._control(slot, msg.message)
                return True
            self._pending_rows += self.streams[slot].add(msg)
        except (wire.ProtocolError, ValueError) as e:
            self.emit(event_row(self.now_ns(), slot, "protocol_error", error=str(e)))
            if conn in self._sockets:
                # A socket that sent one bad frame cannot be trusted to be in step: drop it,
                # keep what it sent before, and every other process's data.
                self._notice(f"{self.procs[slot].role}: bad telemetry, connection dropped ({e})")
                self._disconnected(conn, slot)
                return False
            return True
        return True

    # -- clocks (marlwatch.clock) ------------------------------------------------------------
    def _clock_requests(self) -> None:
        now = time.perf_counter_ns()
        for conn, sync in list(self._clock.items()):
            req = sync.request(now)
            if req is not None:
                try:
                    conn.send_bytes(wire.encode_control(req))
                except OSError:
                    continue  # its reading side is gone: the drain finds out
            if conn in self._backlog and sync.settled(now):
                self._settle(conn, self._conns[conn])

    def _clock_frame(self, conn: Connection, frame: bytes) -> bool:
        """Handle `frame` if it answers a clock request (stamped as soon as it is read)."""
        if not frame.startswith(b'J{"type": "clock_resp"'):
            return False
        now = time.perf_counter_ns()
        try:
            m = wire.decode(frame).message  # type: ignore[union-attr]
        except wire.ProtocolError:
            return False
        sync = self._clock[conn]
        est = sync.response(m.get("seq"), m.get("t_ns"), now)
        if est is not None:
            slot = self._conns[conn]
            self._align(slot, sync)
            self.emit(event_row(self.now_ns(), slot, "clock", offset_ns=est.offset_ns, rtt_ns=est.rtt_ns,
                                samples=est.samples, applied_ns=sync.applied_ns, same_clock=sync.same_clock))
            if conn in self._backlog:
                self._settle(conn, slot)
        return True

    def _settle(self, conn: Connection, slot: int) -> None:
        """The offset is known (or waited for long enough): what waited for it goes out."""
        for frame in self._backlog.pop(conn, []):
            if not self._frame(conn, slot, frame):
                return

    def _disconnected(self, conn: Connection, slot: int) -> None:
        if conn in self._backlog:
            self._settle(conn, slot)
        self._clock.pop(conn, None)
        if conn not in self._conns:
            return  # a bad frame in the backlog dropped it already
        del self._conns[conn]
        with contextlib.suppress(OSError):
            conn.close()
        if conn in self._sockets:
            self._sockets.discard(conn)
            st = self.procs[slot]
            if not st.ended and not any(s == slot for s in self._conns.values()):
                # A process that connected by itself has no exit status for us: it left.
                self.process_event(slot, "left", {"role": st.role})

    def _control(self, slot: int, m: dict[str, Any]) -> None:
        st = self.procs[slot]
        t_raw = m.get("t_ns")
        t = (t_raw - self.streams[slot].t_origin_ns) if isinstance(t_raw, int) else self.now_ns()
        kind = m.get("type")
        if kind == "hello":
            st.on("started", {})
            if isinstance(m.get("pid"), int) and st.pid is None and st.same_machine:
                self.set_pid(slot, m["pid"])
            if isinstance(m.get("core"), int):
                st.core = m["core"]
            detail = {k: m.get(k) for k in ("pid", "core", "spans_impl", "argv", "ppid", "auto_phases") if k in m}
            if "node" in m:
                self._place(slot, m["node"])
            if st.node is not None:
                detail["node"] = st.node
            if not st.same_machine:
                detail["same_machine"] = False
            self.emit(event_row(t, slot, "started", role=st.role, **detail))
        elif kind == "node":  # a process that learnt its node after its hello (a Ray driver)
            self._place(slot, m.get("node"))
            if st.node is not None:
                self.emit(event_row(t, slot, "on_node", node=st.node))
        elif kind == "nodes":  # the nodes of a cluster, the monitor's first (docs/distributed.md)
            local = m.get("local")
            for info in m.get("nodes", []) if isinstance(m.get("nodes"), list) else []:
                self._node(info, local=isinstance(info, dict) and info.get("id") == local)
        elif kind == "sys" and st.node is not None:
            self._node_sample(st, t, m)
        elif kind == "event" and m.get("name") == "lost":
            self._lost(slot, t, m)
        elif kind == "event":
            detail = {k: v for k, v in m.items() if k not in ("type", "name", "t_ns")}
            self.process_event(slot, str(m.get("name", "event")), detail, t_ns=t)

    def process_event(self, slot: int, name: str, detail: dict[str, Any], *, t_ns: int | None = None) -> None:
        """A lifecycle (or other) event of the process in `slot`, from itself or from its launcher:
        applied to its state, recorded, and handed to the run."""
        st = self.procs[slot]
        st.on(name, detail)
        self.emit(event_row(self.now_ns() if t_ns is None else t_ns, slot, name, **detail))
        if self.on_process_event is not None:
            self.on_process_event(st, name, detail)

    def _lost(self, reporter: int, t: int, m: dict[str, Any]) -> None:
        """A process reports another one, by role, gone (a Ray learner its actor, with the actor and
        its node): that one crashed, with that error, whatever its connection said (``left``)."""
        role, error = m.get("role"), m.get("error")
        target = next((s for s, st in self.procs.items() if st.role == role and s != reporter), None)
        if target is None or not isinstance(error, str) or self.procs[target].state in lifecycle.FINAL:
            return  # what a process said of its own end (its crash, with where) says more
        self.process_event(target, "crashed", {"error": error[:300], "reported_by": self.procs[reporter].role}, t_ns=t)

    # -- nodes (marlwatch.nodes) -----------------------------------------------------------
    def _node(self, info: Any, *, local: bool = False) -> Node | None:
        node, changed = self.nodes.add(info, local=local)
        if changed and node is not None:
            self.emit(event_row(self.now_ns(), None, "node", **node.detail()))
        return node

    def _place(self, slot: int, info: Any) -> None:
        """The process in `slot` runs on the node `info` names."""
        st = self.procs[slot]
        # The first node named from this machine is the monitor's (a Ray backend names it first).
        node = self._node(info, local=st.same_machine and self.nodes.local is None)
        if node is None:
            return
        st.node = node.name
        pid = self._hello_pids.get(slot)
        if pid is not None:
            self._slot_by_node_pid[(node.id, pid)] = slot
        if not node.local and node.first_core is not None:
            self.proc_sampler.forget(slot)  # its node's sampler reports it (one row per sample, not two)

    def _node_sample(self, st: ProcState, t: int, m: dict[str, Any]) -> None:
        """A node's sampler reports its cores and the processes it watches (``sys`` frames)."""
        node = next((n for n in self.nodes.by_id.values() if n.name == st.node), None)
        if node is None or node.local:
            return  # the monitor samples its own node
        cores = m.get("cores")
        if isinstance(cores, list) and 0 < len(cores) <= 1024 and all(isinstance(c, int | float) for c in cores):
            if self.nodes.place_cores(node, len(cores)):
                self.emit(event_row(self.now_ns(), None, "node", **node.detail()))
                for slot, other in self.procs.items():
                    if other.node == node.name:
                        self.proc_sampler.forget(slot)  # the node's sampler reports them from now on
            if node.first_core is not None and len(cores) == node.cores:
                self.samples.add_cores(t, [float(c) for c in cores], first=node.first_core)
        samples = []
        for item in m.get("procs", []) if isinstance(m.get("procs"), list) else []:
            if isinstance(item, list) and len(item) == 3 and all(isinstance(v, int | float) for v in item):
                slot = self._slot_by_node_pid.get((node.id, int(item[0])))
                if slot is not None:
                    samples.append(ProcSample(slot, float(item[1]), int(item[2])))
        self.samples.add_procs(t, samples)

    def process_exited(self, slot: int, exitcode: int | None, *, error: str | None = None) -> None:
        """A launcher's report that the process in `slot` ended; reads what it sent before it died."""
        st = self.procs[slot]
        st.exitcode = exitcode
        self.proc_sampler.forget(slot)
        for conn, s in list(self._conns.items()):
            if s == slot:
                # A socket may still hold megabytes the process sent before it ended: read them in
                # passes, each handed on before the next, so memory stays bounded.
                for _ in range(10_000 // _FRAMES_PER_PASS):
                    self.drain(conn, limit=_FRAMES_PER_PASS)
                    self.deliver()
                    if conn not in self._conns or not _readable(conn):
                        break
        st.on("exited", {"exitcode": exitcode, "error": error})
        self.emit(event_row(self.now_ns(), slot, "exited", exitcode=exitcode, state=st.state, error=st.error))
        if self.on_process_event is not None:
            self.on_process_event(st, "exited", {"exitcode": exitcode})

    def _sample(self) -> None:
        now = time.monotonic()
        self._next_sample = now + 1.0 / self.sample_hz
        t = self.now_ns()
        self.samples.add_cores(t, self.core_sampler.sample())
        if now >= self._next_proc_sample:
            # psutil reads two /proc files per process (~0.1 ms each): the per-process figures
            # are sampled at most PROC_SAMPLE_HZ, as top and btop refresh them.
            self._next_proc_sample = now + 1.0 / min(self.sample_hz, PROC_SAMPLE_HZ)
            self.samples.add_procs(t, self.proc_sampler.sample())

    def _notice(self, text: str) -> None:
        self.emit(event_row(self.now_ns(), None, "notice", text=text))

    # -- rows out --------------------------------------------------------------------------
    def emit(self, batch: pa.RecordBatch) -> None:
        """Add rows (SCHEMA) to the run: recorded and passed to listeners at the next `deliver`."""
        self._pending.append(batch)
        self._pending_rows += batch.num_rows

    def deliver(self, *, when_due: bool = False) -> None:
        """Hand the rows that came in since the last call (and the system samples) to the listeners
        and the writer as ONE batch: their cost is mostly per call (a dozen Arrow kernels in Metrics
        and the writer). With `when_due`, only once DELIVER_S passed since the last delivery or
        DELIVER_ROWS rows wait (a pump's rows; a view asks for them before it draws)."""
        now = time.monotonic()
        if when_due and now < self._next_delivery and self._pending_rows < DELIVER_ROWS:
            return
        self._next_delivery = now + DELIVER_S
        for stream in self.streams.values():
            rows = stream.take_rows()
            if rows is not None:
                self._pending.append(rows)
        samples = self.samples.rows()
        if samples is not None:
            self._pending.append(samples)
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        batch = one_batch(pending)
        if batch is None:  # only empty batches
            return
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
        self.deliver(when_due=not final)

    def close(self, detail: dict[str, Any]) -> None:
        """Close every connection and the recording (with its end marker, which listeners see
        too, saying `detail` and the nodes: RunEnd)."""
        if self._acceptor is not None:
            self._acceptor.close()
        for conn in [*self._conns, *self._hello_pending]:
            with contextlib.suppress(OSError):
                conn.close()
        self._conns.clear()
        self._hello_pending.clear()
        self.deliver()
        if self.nodes.by_id:  # a run across machines: its nodes are part of what the end row says
            detail = {**detail, "nodes": [n.detail() for n in self.nodes.by_id.values()]}
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


def _readable(conn: Connection) -> bool:
    try:
        return conn.poll()
    except (OSError, EOFError):
        return True  # the drain finds out and reports it


def _role_of(hello: dict[str, Any]) -> str:
    role = hello.get("role")
    if isinstance(role, str) and role.strip():
        return role.strip()[:60]
    return f"pid {hello.get('pid', '?')}"
