"""The span API: what a training loop calls to say where its time goes.

    import marlwatch

    with marlwatch.span("sample/env_step"):
        obs, rew, term, trunc, info = env.step(actions)

    @marlwatch.phase("update/comm/gnn")
    def propagate(h): ...

    marlwatch.tick()                      # one iteration of this process's loop is done
    marlwatch.gauge("loss/critic", 0.31)  # latest value of something
    marlwatch.counter("episodes")         # something that only counts up
    marlwatch.warmup(12_800, 25_600)      # no updates yet: 12,800 of 25,600 transitions stored

Phase names are paths: the first segment is `sample`, `update` or `sync`; any path with a
`comm` segment counts as communication. Spans nest; a span's parent is the span open around it.

Cost: a span is two clock reads plus four stores into preallocated `array.array`s (no object
is created per span), done in C by `marlwatch._fastspan` where it was built at install time
(Linux with a C compiler) and by the identical Python `PySpan` elsewhere. Spans are shipped in
batches when the buffer fills or, when a span ends or a tick comes, when the last shipment is
older than `flush_interval_s` (0.25 s: the live app redraws every 2 s, faster with `--refresh`, and
every frame costs the monitor a fixed ~0.3 ms whatever its size). `bench/` measures the cost per span.

A process that never called `connect()` (a script run without a monitor) gets spans that
measure nothing and cost almost nothing, so instrumented code runs fine anywhere.

Threads: spans may come from any thread. Each thread records into its own buffer with its own
stack of open spans, so each thread nests on its own (a span's parent is the span open around it
in the same thread); a span object works in any thread. All threads ship over the process's one
connection. The thread that connected pays one compare per span for this; the others a few ns.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import socket
import struct
import sys
import threading
import time
import weakref
from array import array
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from marlwatch.wire import Sink, encode_batch, encode_control, warmup_gauges

__all__ = [
    "Telemetry",
    "connect",
    "counter",
    "disconnect",
    "gauge",
    "phase",
    "span",
    "telemetry",
    "tick",
    "warmup",
]

_now = time.perf_counter_ns
_ident = threading.get_ident
_F = TypeVar("_F", bound=Callable[..., Any])
_NEVER = 2**63 - 1  # a ship_at no span reaches

DEFAULT_CAPACITY = 4096
ROOT = -1  # parent id of a top-level span


class PySpanBuffer:
    """The Python twin of `_fastspan.SpanBuffer`: the caller's preallocated buffers, the count
    of spans in them, the stack of open spans (their phase ids over a ROOT sentinel, and their
    start times) of the thread that owns it, and for the root buffer the way to the other
    threads' buffers (`for_thread`)."""

    __slots__ = ("ids", "parents", "t0", "t1", "n", "capacity", "open_ids", "open_t0", "on_full", "ship_at",
                 "owner", "for_thread")

    def __init__(self, ids: array, parents: array, t0: array, t1: array, on_full: Callable[[Any], None],
                 for_thread: Callable[[], PySpanBuffer] | None = None) -> None:
        if not (len(ids) == len(parents) == len(t0) == len(t1) > 0):
            raise ValueError("span buffers must be non-empty and of one length")
        self.ids, self.parents, self.t0, self.t1 = ids, parents, t0, t1
        self.capacity = len(ids)
        self.n = 0
        self.open_ids: list[int] = [ROOT]  # the sentinel makes "the parent" a plain [-1]
        self.open_t0: list[int] = []
        self.on_full = on_full
        self.ship_at = _NEVER
        self.owner = _ident()
        self.for_thread = for_thread

    @property
    def depth(self) -> int:
        return len(self.open_t0)

    def thread_buffer(self) -> PySpanBuffer:
        """The calling thread's buffer under this root."""
        if self.for_thread is None or self.owner == _ident():
            return self
        return self.for_thread()

    def forget(self, buffer: PySpanBuffer) -> None:
        """The C root drops its reference to a thread's buffer here; the Python root holds none."""


def _unwind(open_ids: list[int], open_t0: list[int], phase_id: int) -> bool:
    """Drop the frames opened inside the innermost open span of `phase_id` and never ended (a
    hook whose closing half did not run because of an exception). False if none is open."""
    for k in range(len(open_ids) - 1, 0, -1):
        if open_ids[k] == phase_id:
            del open_ids[k + 1 :], open_t0[k:]
            return True
    return False


class PySpan:
    """The Python twin of `_fastspan.Span`: a named phase, reusable and nestable, from any thread."""

    __slots__ = ("_buf", "id", "name", "_open_ids", "_open_t0", "_owner")

    def __init__(self, buffer: PySpanBuffer, phase_id: int, name: str) -> None:
        self._buf = buffer
        self.id = phase_id
        self.name = name
        # Local references keep attribute look-ups off the owner thread's path.
        self._open_ids, self._open_t0 = buffer.open_ids, buffer.open_t0
        self._owner = buffer.owner if buffer.for_thread is not None else None

    def __enter__(self) -> PySpan:
        if self._owner is None or _ident() == self._owner:
            self._open_ids.append(self.id)
            self._open_t0.append(_now())
        else:
            b = self._buf.thread_buffer()
            b.open_ids.append(self.id)
            b.open_t0.append(_now())
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        t1 = _now()
        if self._owner is None or _ident() == self._owner:
            b, open_ids, open_t0 = self._buf, self._open_ids, self._open_t0
        else:
            b = self._buf.thread_buffer()
            open_ids, open_t0 = b.open_ids, b.open_t0
        if open_ids[-1] != self.id and not _unwind(open_ids, open_t0, self.id):
            raise RuntimeError("span ended that was never started")
        i = b.n
        b.ids[i] = open_ids.pop()
        b.parents[i] = open_ids[-1]
        b.t0[i] = open_t0.pop()
        b.t1[i] = t1
        i += 1
        b.n = i
        if i >= b.capacity or t1 >= b.ship_at:
            b.on_full(b)
            if b.n >= b.capacity:  # on_full did not empty the buffers: drop, never overrun
                b.n = 0

    @property
    def innermost(self) -> bool:
        """Whether this phase is the innermost span open in the calling thread."""
        return self._buf.thread_buffer().open_ids[-1] == self.id

    def abandon(self) -> None:
        """Drop this thread's innermost open span of this phase (and any inside it), unrecorded."""
        b = self._buf.thread_buffer()
        if _unwind(b.open_ids, b.open_t0, self.id):
            b.open_ids.pop()
            b.open_t0.pop()


class PyNullSpan:
    """What `span()` returns when spans are switched off: does nothing."""

    __slots__ = ()

    def __enter__(self) -> PyNullSpan:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        return None

    innermost = False

    def abandon(self) -> None:
        return None


FASTSPAN_ABI = 2  # what _fastspan.c's FASTSPAN_ABI must be for this file's calls


def _c_spans() -> tuple[type, type, type] | None:
    """The C span types, if they were built here and stamp with the same clock as `_now`."""
    try:
        from marlwatch import _fastspan
    except ImportError:
        return None
    if getattr(_fastspan, "ABI", None) != FASTSPAN_ABI:
        return None  # built from another version of _fastspan.c: `pip install -e .` rebuilds it
    a, c, b = _now(), _fastspan.now_ns(), _now()
    if not a <= c <= b:
        return None
    return _fastspan.SpanBuffer, _fastspan.Span, _fastspan.NullSpan


# Which implementation spans use: "c" where `marlwatch._fastspan` was built (Linux with a C
# compiler at install time), "python" elsewhere. Both record exactly the same; tests run both.
_C = _c_spans()
IMPLEMENTATIONS: dict[str, tuple[type, type, type]] = {"python": (PySpanBuffer, PySpan, PyNullSpan)}
if _C is not None:
    IMPLEMENTATIONS["c"] = _C
# MARLWATCH_SPANS=python picks the Python spans where the C ones exist (to compare the two, or
# to rule the C spans out); children inherit it with the rest of the environment.
DEFAULT_IMPLEMENTATION = os.environ.get("MARLWATCH_SPANS", "c" if _C is not None else "python")
if DEFAULT_IMPLEMENTATION not in IMPLEMENTATIONS:
    DEFAULT_IMPLEMENTATION = "python"  # "c" asked for where it was not built: spans still work


class _ThreadEnd:
    """Held in a thread-local: dropped when its thread ends (in that thread), it ships what the
    thread's buffer still holds and lets the root forget the buffer."""

    __slots__ = ("telemetry", "buffer")

    def __init__(self, telemetry: Telemetry, buffer: Any) -> None:
        self.telemetry = weakref.ref(telemetry)  # no cycle: the local belongs to the Telemetry
        self.buffer = buffer

    def __del__(self) -> None:
        tel = self.telemetry()
        if tel is not None:
            tel._retire(self.buffer)


class Telemetry:
    """One process's buffers of spans (one per thread that records spans), iteration ticks and
    counters, and where it ships them.

    Each thread's spans go to that thread's own buffer, so each thread nests on its own. A
    buffer is shipped by the thread that records into it (never read from another thread: the
    Python spans write a span in several steps): when it is full, when one of its spans ends
    `flush_interval_s` after its last shipment, at the owner's `tick()`/`flush()`, and when its
    thread ends. Everything goes out over the one sink, one frame at a time under a lock.
    """

    def __init__(
        self,
        sink: Sink | None = None,
        *,
        spans_enabled: bool = True,
        capacity: int = DEFAULT_CAPACITY,
        flush_interval_s: float = 0.25,
        implementation: str = DEFAULT_IMPLEMENTATION,
    ) -> None:
        self.sink = sink
        self.spans_enabled = spans_enabled and sink is not None
        self._flush_interval_ns = int(flush_interval_s * 1e9)
        self._buffer_type, self._span_type, null_type = IMPLEMENTATIONS[implementation]
        self.implementation = implementation
        self._capacity = capacity
        self._local = threading.local()
        self._buf = self._new_buffer(for_thread=self._thread_buffer)
        self._null_span = null_type()
        self._spans: dict[str, Any] = {}
        self._new_names: list[str] = []
        self.iteration = 0
        self._ticks: list[int] = []
        self._counters: list[tuple[str, int, float]] = []
        self._last_flush = _now()
        # Held while a frame is built and sent, and while a name gets its id. Re-entrant: a
        # garbage collection during a flush may end a thread-local (_ThreadEnd) in this thread.
        self._lock = threading.RLock()
        self.spans_sent = 0
        self._pid = os.getpid()
        # Set on the process-wide instance when MARLWATCH_ADDRESS names a monitor: the first
        # span, tick, gauge or counter connects (see `_connect_from_env`).
        self._autoconnect = False
        self._closes_at_exit = False
        self._user_ticks = False  # tick() was called: the auto phases tick no more
        self._armed = False  # an update auto phase ended since the last auto tick

    def _new_buffer(self, for_thread: Callable[[], Any] | None = None) -> Any:
        n = self._capacity
        arrays = array("i", bytes(4 * n)), array("i", bytes(4 * n)), array("q", bytes(8 * n)), array("q", bytes(8 * n))
        buf = self._buffer_type(*arrays, self._ship, for_thread)
        buf.ship_at = _now() + self._flush_interval_ns
        return buf

    def _thread_buffer(self) -> Any:
        """The calling thread's buffer (made on its first span), for a thread other than the root's."""
        try:
            return self._local.end.buffer
        except AttributeError:
            buf = self._new_buffer()
            self._local.end = _ThreadEnd(self, buf)
            return buf

    def _retire(self, buf: Any) -> None:
        """A thread that recorded spans ends: ship what it left, and let the root drop its buffer."""
        if os.getpid() != self._pid:
            return  # a forked child dropping its parent's threads: `_forked` resets it all
        with contextlib.suppress(Exception):  # runs while a thread ends: nowhere to report to
            self._ship(buf)
            self._buf.forget(buf)

    @property
    def spans_buffered(self) -> int:
        """Spans recorded by the calling thread and not yet shipped."""
        return self._current_buffer().n

    def _current_buffer(self) -> Any:
        return self._buf if self._buf.owner == _ident() else self._thread_buffer()

    # -- the API -------------------------------------------------------------------------
    def span(self, name: str) -> AbstractContextManager[Any]:
        if not self.spans_enabled:
            if not self._autoconnect:
                return self._null_span
            self._connect_from_env()
            if not self.spans_enabled:
                return self._null_span
        s = self._spans.get(name)
        if s is None:
            with self._lock:  # two threads naming new phases at once must not share an id
                s = self._spans.get(name)
                if s is None:
                    s = self._spans[name] = self._span_type(self._buf, len(self._spans), name)
                    self._new_names.append(name)
        return s

    def tick(self, n: int = 1) -> None:
        if self._autoconnect:
            self._connect_from_env()
        self._user_ticks = True  # the program counts its own iterations: no more auto ticks
        self._tick(n)

    def _auto_tick(self) -> None:
        """An iteration by the auto phases' rule (marlwatch.autophases): a sample phase starts
        after an update phase ended."""
        self._armed = False
        if not self._user_ticks:
            if self._autoconnect:
                self._connect_from_env()
            self._tick(1)

    def _tick(self, n: int) -> None:
        t = _now()
        with self._lock:
            self.iteration += n
            self._ticks.append(t)
        if t - self._last_flush >= self._flush_interval_ns:
            self.flush()

    def gauge(self, name: str, value: float) -> None:
        if self._autoconnect:
            self._connect_from_env()
        with self._lock:
            self._counters.append((name, _now(), float(value)))

    def counter(self, name: str, inc: float = 1.0) -> None:
        # Counters are recorded as their increments; readers sum them.
        if self._autoconnect:
            self._connect_from_env()
        with self._lock:
            self._counters.append((name, _now(), float(inc)))

    def event(self, name: str, **detail: Any) -> None:
        """A control message to the monitor (worker state, errors); sent at once."""
        if self.sink is not None:
            with self._lock:
                self.flush()
                self._send(encode_control({"type": "event", "name": name, "t_ns": _now(), **detail}))

    def control(self, message: dict[str, Any]) -> None:
        """Any other control frame (``nodes``, ``sys``: docs/distributed.md), sent at once."""
        self._send_locked(encode_control({"t_ns": _now(), **message}))

    def _send_locked(self, payload: bytes) -> None:
        with self._lock:
            if self.sink is not None:
                self._send(payload)

    def answer_clock(self, conn: Any) -> None:
        """Answer the monitor's clock requests arriving on `conn` (a socket to a monitor on
        another machine, maybe: marlwatch.clock), from a thread of their own."""
        from marlwatch.clock import Responder

        Responder(conn, self._send_locked)

    # -- connecting ----------------------------------------------------------------------
    def attach(self, sink: Sink, *, spans_enabled: bool = True, **hello: Any) -> None:
        """Ship to `sink` from now on, starting with a hello frame carrying `hello`."""
        with self._lock:
            self.sink = sink
            self.spans_enabled = spans_enabled
            self._send(encode_control({"type": "hello", "t_ns": _now(), "spans_impl": self.implementation,
                                       "threads": True, **hello}))
            if not self._closes_at_exit:
                self._closes_at_exit = True
                _close_at_exit(self)

    def _connect_from_env(self) -> None:
        """Connect to the monitor named by MARLWATCH_ADDRESS/MARLWATCH_AUTHKEY. If it cannot be
        reached, one warning line on stderr and spans stay off: the program runs on."""
        with self._lock:
            if not self._autoconnect:
                return  # another thread got here first
            self._autoconnect = False
            text = os.environ.get(ADDRESS_ENV, "")
            try:
                address = parse_address(text)
                sink = dial(address, bytes.fromhex(os.environ.get(AUTHKEY_ENV, "")))
            except Exception as e:  # noqa: BLE001 - whatever it is, training must go on
                _warn_unreachable(text, e)
                return
            self.attach(sink, **_hello())
            self.answer_clock(sink)

    def _forked(self) -> None:
        """In a child made by fork: forget the parent's connection and spans (never write to the
        parent's socket), keep the span objects and phase names, and connect again on first use."""
        self._lock = threading.RLock()  # another thread may have held it at the fork
        self._pid = os.getpid()
        sink, self.sink = self.sink, None
        if sink is not None:
            with contextlib.suppress(OSError):
                sink.close()  # closes this process's copy of the descriptor; nothing is sent
        me = _ident()
        for buf in getattr(self._buf, "threads", {}).values():
            if buf.owner != me:  # those threads do not exist here
                self._buf.forget(buf)
        now = _now()
        for buf in {self._buf, self._current_buffer()}:
            buf.n = 0
            buf.ship_at = now + self._flush_interval_ns
        self._ticks, self._counters = [], []
        self._armed = False
        self.iteration = 0
        self.spans_sent = 0
        self._last_flush = now
        self._new_names = list(self._spans)  # a new connection: the monitor learns every name again
        self.spans_enabled = False
        self._closes_at_exit = False  # multiprocessing's child finalizers were cleared at the fork
        self._autoconnect = bool(os.environ.get(ADDRESS_ENV))

    # -- shipping ------------------------------------------------------------------------
    def flush(self) -> None:
        """Ship the calling thread's spans, and the ticks and counters of every thread."""
        self._ship(self._current_buffer())

    def _ship(self, buf: Any) -> None:
        with self._lock:
            if self.sink is not None and os.getpid() != self._pid:
                # A forked child before `_forked` ran (a thread-local dropped at the fork): the
                # sink is the parent's. Never write to it.
                buf.n = 0
                return
            n = buf.n
            now = _now()
            buf.ship_at = now + self._flush_interval_ns
            self._last_flush = now
            if self.sink is None:
                buf.n = 0
                self._ticks.clear()
                self._counters.clear()
                return
            if not (n or self._ticks or self._counters or self._new_names):
                return
            payload = encode_batch(
                new_names=self._new_names,
                ids=buf.ids,
                parents=buf.parents,
                t0=buf.t0,
                t1=buf.t1,
                n=n,
                ticks=self._ticks,
                first_iteration=self.iteration - len(self._ticks),
                counters=self._counters,
            )
            self._new_names = []
            buf.n = 0
            self._ticks = []
            self._counters = []
            self.spans_sent += n
            self._send(payload)

    def _send(self, payload: bytes) -> None:
        try:
            self.sink.send_bytes(payload)  # type: ignore[union-attr]
        except (BrokenPipeError, EOFError, OSError):
            # The monitor is gone; the run is ending. Training code must not die of it.
            self.sink = None
            self.spans_enabled = False

    def close(self) -> None:
        """Ship what is left (the calling thread's spans, and the root's if its thread has
        ended; other threads ship theirs as they end) and close the sink."""
        with self._lock:
            if self.sink is not None:
                if self._armed:  # the last sample-then-update cycle is complete too
                    self._auto_tick()
                self.flush()
                if self._buf.owner not in {t.ident for t in threading.enumerate()}:
                    # The root belongs to a thread that has ended (the one that imported
                    # marlwatch first): nobody writes to it any more, so it is safe to ship here.
                    self._ship(self._buf)
                _wake_reader(self.sink)
                with contextlib.suppress(OSError):
                    self.sink.close()  # type: ignore[union-attr]
                self.sink = None


def _wake_reader(sink: Any) -> None:
    """A thread blocked reading a socket (the clock responder) is not woken by close(): shut it down."""
    fileno = getattr(sink, "fileno", None)
    if fileno is None:
        return
    with contextlib.suppress(OSError, ValueError, TypeError):
        sock = socket.socket(fileno=os.dup(fileno()))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


# -- connecting from the environment -------------------------------------------------------
# What `marlwatch run -- COMMAND` and `marlwatch listen` hand to the processes they watch.
ADDRESS_ENV = "MARLWATCH_ADDRESS"  # "unix:/abs/path" or "HOST:PORT"
AUTHKEY_ENV = "MARLWATCH_AUTHKEY"  # hex; bytes.fromhex gives the connection's authkey
AUTO_PHASES_ENV = "MARLWATCH_AUTO_PHASES"  # "1": install the auto phases (marlwatch.autophases)
CONNECT_TIMEOUT_S = 10.0  # a monitor that accepts but never answers must not hang training


def parse_address(text: str) -> str | tuple[str, int]:
    """`unix:/abs/path` -> the socket path (AF_UNIX); `HOST:PORT` -> (host, port) (AF_INET)."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not os.path.isabs(path):
            raise ValueError(f"{ADDRESS_ENV} wants an absolute socket path after unix:, not {path!r}")
        return path
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{ADDRESS_ENV} is {text!r}: expected unix:/abs/path or HOST:PORT")
    return host, int(port)


def dial(address: str | tuple[str, int], authkey: bytes, timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """What `multiprocessing.connection.Client(address, authkey=authkey)` does (the same socket,
    Connection and handshake, so the monitor's Listener sees no difference), with a time limit on
    connecting and on the handshake; none afterwards (a full socket then blocks the sender, which
    is the monitor's back-pressure)."""
    from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    limit = struct.pack("ll", int(timeout_s), int(timeout_s % 1 * 1e6))
    try:
        # SO_*TIMEO, not settimeout(): Connection reads the descriptor, which must stay blocking.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
        sock = socket.socket(fileno=conn.fileno())
        try:
            no_limit = struct.pack("ll", 0, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, no_limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, no_limit)
        finally:
            sock.detach()
    except BaseException:
        conn.close()
        raise
    return conn


def _warn_unreachable(address: str, error: BaseException) -> None:
    from multiprocessing import AuthenticationError

    if isinstance(error, AuthenticationError):
        why = f"it refused the key ({AUTHKEY_ENV})"
    elif isinstance(error, EOFError):
        why = "it closed the connection"
    elif isinstance(error, (BlockingIOError, TimeoutError)):
        why = f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
    else:
        why = str(error) or type(error).__name__
    why = " ".join(why.split())
    try:
        sys.stderr.write(f"marlwatch: warning: cannot connect to the monitor at {address!r}: {why}; "
                         "running on without spans\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # no stderr: nothing to say it on
    # The processes this one starts would fail the same way: one line is enough.
    os.environ.pop(ADDRESS_ENV, None)
    os.environ.pop(AUTHKEY_ENV, None)


_ARGV_ITEMS, _ARGV_CHARS, _ROLE_CHARS = 64, 4096, 60
# Vector-env worker functions, by module prefix: the role shown for a process running one.
_VECTOR_ENV_WORKERS = {
    "gymnasium.vector": "AsyncVectorEnv worker",
    "stable_baselines3.common.vec_env": "SubprocVecEnv worker",
    "torchrl.envs": "TorchRL env worker",
    "pettingzoo": "PettingZoo env worker",
}


def _role() -> str:
    """A short name for this process: its multiprocessing name (with the vector-env worker it
    runs, if recognised), or its command line."""
    mp = sys.modules.get("multiprocessing")
    if mp is not None and mp.parent_process() is not None:
        proc = mp.current_process()
        module = getattr(getattr(proc, "_target", None), "__module__", None) or ""
        for prefix, worker in _VECTOR_ENV_WORKERS.items():
            if module.startswith(prefix):
                return f"{worker} ({proc.name})"
        return proc.name
    actor = _ray_actor()
    if actor is not None:
        return actor
    argv = getattr(sys, "orig_argv", None) or sys.argv or ["python"]
    # `/usr/bin/python3 /home/me/rl/train.py --lr 3e-4` -> `python3 train.py --lr 3e-4`
    words = [os.path.basename(argv[0])] + [os.path.basename(a) if a.endswith(".py") else a for a in argv[1:]]
    role = " ".join(" ".join(words).split())
    return role if len(role) <= _ROLE_CHARS else role[: _ROLE_CHARS - 3] + "..."


def _hello() -> dict[str, Any]:
    argv, size = [], 0
    for a in sys.argv[:_ARGV_ITEMS]:
        a = a[:_ARGV_CHARS - size]
        argv.append(a)
        size += len(a)
        if size >= _ARGV_CHARS:
            break
    from marlwatch.clock import capability

    auto = sys.modules.get("marlwatch.autophases")
    hello = {"pid": os.getpid(), "ppid": os.getppid(), "argv": argv, "role": _role(),
             "auto_phases": bool(auto is not None and auto.installed()), "clock": capability()}
    node = ray_node()
    if node is not None:
        hello["node"] = node
    return hello


def _ray() -> Any:
    """Ray, when this process imported and initialised it (it is a Ray worker or driver); else None."""
    ray = sys.modules.get("ray")
    try:
        return ray if ray is not None and ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - Ray's internals moved: as if there were no Ray
        return None


def _ray_actor() -> str | None:
    """``ray actor ClassName`` inside a Ray actor (its argv is Ray's default_worker.py)."""
    ray = _ray()
    try:
        ctx = ray.get_runtime_context() if ray is not None else None
        if ctx is None or not ctx.get_actor_id():
            return None
        name = ctx.current_actor._ray_actor_creation_function_descriptor.class_name
        return f"ray actor {name}"[:_ROLE_CHARS]
    except Exception:  # noqa: BLE001 - Ray's internals moved: the plain role will do
        return None


def ray_node() -> dict[str, str] | None:
    """The Ray node this process runs on, when it is a Ray worker or driver (Ray imported and
    initialised): the monitor groups processes and cores by node."""
    ray = _ray()
    if ray is None:
        return None
    try:
        from ray.util import get_node_ip_address

        return {"id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "ip": get_node_ip_address()}
    except Exception:  # noqa: BLE001 - a node we cannot name is no reason to stop the program
        return None


def _close_at_exit(tel: Telemetry) -> None:
    atexit.register(tel.close)
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        # A multiprocessing child made by fork or forkserver ends with os._exit, past atexit:
        # its finalizers are what runs last.
        util.Finalize(None, tel.close, exitpriority=0)


# -- the process-wide instance ---------------------------------------------------------------
_telemetry = Telemetry(None)
_telemetry._autoconnect = bool(os.environ.get(ADDRESS_ENV))


def _after_fork_in_child() -> None:
    _telemetry._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
if _telemetry._autoconnect and os.environ.get(AUTO_PHASES_ENV) == "1":
    # A watched process that imports marlwatch without the start-up hook on its PYTHONPATH.
    from marlwatch import autophases

    autophases.install(lambda: sys.modules[__name__])


def telemetry() -> Telemetry:
    """The process's current Telemetry (a do-nothing one until connected: by `connect()`, or on
    first use when MARLWATCH_ADDRESS names a monitor)."""
    if _telemetry._autoconnect:
        _telemetry._connect_from_env()
    return _telemetry


def connect(sink: Sink, *, spans_enabled: bool = True, implementation: str = DEFAULT_IMPLEMENTATION,
            **hello: Any) -> Telemetry:
    """Ship this process's telemetry to `sink` (a multiprocessing Connection or alike)."""
    global _telemetry
    _telemetry.close()
    _telemetry = Telemetry(sink, spans_enabled=spans_enabled, implementation=implementation)
    sink.send_bytes(encode_control({"type": "hello", "t_ns": _now(), "spans_impl": implementation,
                                    "threads": True, **hello}))
    _telemetry._closes_at_exit = True
    _close_at_exit(_telemetry)
    return _telemetry


def connect_monitor(address: str, authkey: bytes, *, spans_enabled: bool = True, **hello: Any) -> Telemetry:
    """Connect to the monitor listening at `address` (the MARLWATCH_ADDRESS format) with `authkey`,
    saying `hello`, and answer its clock requests (a process on another machine: a Ray actor)."""
    from marlwatch.clock import capability

    sink = dial(parse_address(address), authkey)
    tel = connect(sink, spans_enabled=spans_enabled, clock=capability(), **hello)
    tel.answer_clock(sink)
    return tel


def disconnect() -> None:
    global _telemetry
    _telemetry.close()
    _telemetry = Telemetry(None)


def span(name: str) -> AbstractContextManager[Any]:
    """A context manager timing the phase `name` (e.g. ``"update/comm/gnn"``)."""
    return _telemetry.span(name)


def phase(name: str) -> Callable[[_F], _F]:
    """Decorator form of `span`: every call of the function is one span of `name`."""

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _telemetry.span(name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def tick(n: int = 1) -> None:
    """Mark the end of `n` iterations of this process's loop."""
    _telemetry.tick(n)


def gauge(name: str, value: float) -> None:
    """Record the current value of `name` (reward, loss, ...)."""
    _telemetry.gauge(name, value)


def counter(name: str, inc: float = 1.0) -> None:
    """Add `inc` to the count `name`."""
    _telemetry.counter(name, inc)


def warmup(done: float, needed: float, unit: str = "transitions") -> None:
    """Report warm-up progress: `done` of the `needed` (in `unit`) that the learner waits for
    before its first update (a replay buffer filling). While done < needed the views say
    "warming up done/needed unit" instead of showing update and communication shares of zero as
    if they were measurements. Call it each iteration while warming up, and once when done."""
    name_done, name_needed = warmup_gauges(unit)
    _telemetry.gauge(name_done, done)
    _telemetry.gauge(name_needed, needed)


@contextlib.contextmanager
def spans_off() -> Iterator[None]:
    """Switch spans off for a block (iterations are still counted)."""
    tel = telemetry()  # a first use: connect first, or the block would end with spans off for good
    was = tel.spans_enabled
    tel.spans_enabled = False
    try:
        yield
    finally:
        tel.spans_enabled = was
