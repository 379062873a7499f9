"""The span API: what a training loop calls to say where its time goes.

    import marlwatch

    with marlwatch.span("sample/env_step"):
        obs, rew, term, trunc, info = env.step(actions)

    @marlwatch.phase("update/comm/gnn")
    def propagate(h): ...

    marlwatch.tick()                      # one iteration of this process's loop is done
    marlwatch.gauge("loss/critic", 0.31)  # latest value of something
    marlwatch.counter("episodes")         # something that only counts up

Phase names are paths: the first segment is `sample`, `update` or `sync`; any path with a
`comm` segment counts as communication. Spans nest; a span's parent is the span open around it.

Cost: a span is two clock reads plus four stores into preallocated `array.array`s (no object
is created per span), done in C by `marlwatch._fastspan` where it was built at install time
(Linux with a C compiler) and by the identical Python `PySpan` elsewhere. Spans are shipped in
batches when the buffer fills or, at a tick, when the last flush is older than
`flush_interval_s` (0.25 s: the live app redraws at 4 Hz, and every frame costs the monitor a
fixed ~0.3 ms whatever its size). `bench/` measures the cost per span.

A process that never called `connect()` (a script run without a monitor) gets spans that
measure nothing and cost almost nothing, so instrumented code runs fine anywhere.

Threads: one `Telemetry` belongs to one thread (the training loop). Spans from other threads
are not supported yet; they would need their own buffer.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from marlwatch.wire import Sink, encode_batch, encode_control

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
]

_now = time.perf_counter_ns
_F = TypeVar("_F", bound=Callable[..., Any])

DEFAULT_CAPACITY = 4096
ROOT = -1  # parent id of a top-level span


class PySpanBuffer:
    """The Python twin of `_fastspan.SpanBuffer`: the caller's preallocated buffers, the count
    of spans in them, and the stack of open spans (their phase ids over a ROOT sentinel, and
    their start times)."""

    __slots__ = ("ids", "parents", "t0", "t1", "n", "capacity", "open_ids", "open_t0", "on_full")

    def __init__(self, ids: array, parents: array, t0: array, t1: array, on_full: Callable[[], None]) -> None:
        if not (len(ids) == len(parents) == len(t0) == len(t1) > 0):
            raise ValueError("span buffers must be non-empty and of one length")
        self.ids, self.parents, self.t0, self.t1 = ids, parents, t0, t1
        self.capacity = len(ids)
        self.n = 0
        self.open_ids: list[int] = [ROOT]  # the sentinel makes "the parent" a plain [-1]
        self.open_t0: list[int] = []
        self.on_full = on_full

    @property
    def depth(self) -> int:
        return len(self.open_t0)


class PySpan:
    """The Python twin of `_fastspan.Span`: a named phase, reusable and nestable."""

    __slots__ = ("_buf", "id", "name", "_open_ids", "_open_t0")

    def __init__(self, buffer: PySpanBuffer, phase_id: int, name: str) -> None:
        self._buf = buffer
        self.id = phase_id
        self.name = name
        # Local references keep attribute look-ups off the hot path.
        self._open_ids, self._open_t0 = buffer.open_ids, buffer.open_t0

    def __enter__(self) -> PySpan:
        self._open_ids.append(self.id)
        self._open_t0.append(_now())
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        t1 = _now()
        open_t0 = self._open_t0
        if not open_t0:
            raise RuntimeError("span ended that was never started")
        b = self._buf
        open_ids = self._open_ids
        i = b.n
        b.ids[i] = open_ids.pop()
        b.parents[i] = open_ids[-1]
        b.t0[i] = open_t0.pop()
        b.t1[i] = t1
        i += 1
        b.n = i
        if i >= b.capacity:
            b.on_full()
            if b.n >= b.capacity:  # on_full did not empty the buffers: drop, never overrun
                b.n = 0


class PyNullSpan:
    """What `span()` returns when spans are switched off: does nothing."""

    __slots__ = ()

    def __enter__(self) -> PyNullSpan:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        return None


def _c_spans() -> tuple[type, type, type] | None:
    """The C span types, if they were built here and stamp with the same clock as `_now`."""
    try:
        from marlwatch import _fastspan
    except ImportError:
        return None
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


class Telemetry:
    """One process's buffer of spans, iteration ticks and counters, and where it ships them."""

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
        buffer_type, self._span_type, null_type = IMPLEMENTATIONS[implementation]
        self.implementation = implementation
        self._ids = array("i", bytes(4 * capacity))
        self._parents = array("i", bytes(4 * capacity))
        self._t0 = array("q", bytes(8 * capacity))
        self._t1 = array("q", bytes(8 * capacity))
        self._buf = buffer_type(self._ids, self._parents, self._t0, self._t1, self.flush)
        self._null_span = null_type()
        self._spans: dict[str, Any] = {}
        self._new_names: list[str] = []
        self.iteration = 0
        self._ticks: list[int] = []
        self._counters: list[tuple[str, int, float]] = []
        self._last_flush = _now()
        self._lock = threading.Lock()  # flush may come from the hot path or from close()
        self.spans_sent = 0

    @property
    def spans_buffered(self) -> int:
        """Spans recorded and not yet shipped."""
        return self._buf.n

    # -- the API -------------------------------------------------------------------------
    def span(self, name: str) -> AbstractContextManager[Any]:
        if not self.spans_enabled:
            return self._null_span
        s = self._spans.get(name)
        if s is None:
            s = self._spans[name] = self._span_type(self._buf, len(self._spans), name)
            self._new_names.append(name)
        return s

    def tick(self, n: int = 1) -> None:
        self.iteration += n
        t = _now()
        self._ticks.append(t)
        if t - self._last_flush >= self._flush_interval_ns:
            self.flush()

    def gauge(self, name: str, value: float) -> None:
        self._counters.append((name, _now(), float(value)))

    def counter(self, name: str, inc: float = 1.0) -> None:
        # Counters are recorded as their increments; readers sum them.
        self._counters.append((name, _now(), float(inc)))

    def event(self, name: str, **detail: Any) -> None:
        """A control message to the monitor (worker state, errors); sent at once."""
        if self.sink is not None:
            self.flush()
            self._send(encode_control({"type": "event", "name": name, "t_ns": _now(), **detail}))

    # -- shipping ------------------------------------------------------------------------
    def flush(self) -> None:
        if self.sink is None:
            self._buf.n = 0
            self._ticks.clear()
            self._counters.clear()
            return
        with self._lock:
            n = self._buf.n
            if not (n or self._ticks or self._counters or self._new_names):
                self._last_flush = _now()
                return
            payload = encode_batch(
                new_names=self._new_names,
                ids=self._ids,
                parents=self._parents,
                t0=self._t0,
                t1=self._t1,
                n=n,
                ticks=self._ticks,
                first_iteration=self.iteration - len(self._ticks),
                counters=self._counters,
            )
            self._new_names = []
            self._buf.n = 0
            self._ticks = []
            self._counters = []
            self.spans_sent += n
            self._last_flush = _now()
            self._send(payload)

    def _send(self, payload: bytes) -> None:
        try:
            self.sink.send_bytes(payload)  # type: ignore[union-attr]
        except (BrokenPipeError, EOFError, OSError):
            # The monitor is gone; the run is ending. Training code must not die of it.
            self.sink = None
            self.spans_enabled = False

    def close(self) -> None:
        if self.sink is not None:
            self.flush()
            with contextlib.suppress(OSError):
                self.sink.close()
            self.sink = None


# -- the process-wide instance ---------------------------------------------------------------
_telemetry = Telemetry(None)


def telemetry() -> Telemetry:
    """The process's current Telemetry (a do-nothing one until `connect()`)."""
    return _telemetry


def connect(sink: Sink, *, spans_enabled: bool = True, implementation: str = DEFAULT_IMPLEMENTATION,
            **hello: Any) -> Telemetry:
    """Ship this process's telemetry to `sink` (a multiprocessing Connection or alike)."""
    global _telemetry
    _telemetry.close()
    _telemetry = Telemetry(sink, spans_enabled=spans_enabled, implementation=implementation)
    sink.send_bytes(encode_control({"type": "hello", "t_ns": _now(), "spans_impl": implementation, **hello}))
    atexit.register(_telemetry.close)
    return _telemetry


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


@contextlib.contextmanager
def spans_off() -> Iterator[None]:
    """Switch spans off for a block (iterations are still counted)."""
    was = _telemetry.spans_enabled
    _telemetry.spans_enabled = False
    try:
        yield
    finally:
        _telemetry.spans_enabled = was
