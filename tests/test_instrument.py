"""The span API and its wire format, through a real pipe."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import sys
import time

import pytest

from marlwatch import instrument, wire


# Every test of the API runs on each span implementation built here (C and Python on Linux).
@pytest.fixture(params=sorted(instrument.IMPLEMENTATIONS))
def implementation(request) -> str:
    return request.param


@pytest.fixture
def pipe_telemetry(implementation):
    r, w = mp.Pipe(duplex=False)
    tel = instrument.connect(w, implementation=implementation, role="test", slot=0)
    assert tel.implementation == implementation
    hello = wire.decode(r.recv_bytes())
    assert isinstance(hello, wire.Control) and hello.message["type"] == "hello"
    yield tel, r
    instrument.disconnect()
    r.close()


def frames(r) -> list:
    out = []
    while r.poll(0.1):
        out.append(wire.decode(r.recv_bytes()))
    return out


def frames_until(r, count: int) -> list:
    out: list = []
    while len(out) < count and r.poll(5):
        out.append(wire.decode(r.recv_bytes()))
    return out


def test_nested_spans_record_parent_and_times(pipe_telemetry):
    tel, r = pipe_telemetry
    with instrument.span("update"):
        with instrument.span("update/comm/gnn"):
            time.sleep(0.002)
        with instrument.span("update/critic"):
            pass
    instrument.tick()
    tel.flush()
    (batch,) = [f for f in frames(r) if isinstance(f, wire.Batch)]
    names = batch.new_names
    got = [(names[i], names[p] if p >= 0 else None) for i, p in zip(batch.ids, batch.parents, strict=True)]
    # Spans are recorded when they end: children first.
    assert got == [("update/comm/gnn", "update"), ("update/critic", "update"), ("update", None)]
    assert (batch.t1 >= batch.t0).all()
    assert batch.t1[0] - batch.t0[0] >= 2_000_000
    outer = 2
    assert batch.t0[outer] <= batch.t0[0] and batch.t1[outer] >= batch.t1[1]
    assert len(batch.ticks) == 1 and batch.first_iteration == 0


def test_decorator_counts_every_call_and_keeps_exceptions(pipe_telemetry):
    tel, r = pipe_telemetry

    @instrument.phase("sample/act")
    def act(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x * 2

    assert act(2) == 4
    with pytest.raises(ValueError):
        act(-1)
    tel.flush()
    (batch,) = [f for f in frames(r) if isinstance(f, wire.Batch)]
    assert batch.new_names == ["sample/act"] and len(batch.ids) == 2  # the failing call is timed too


def test_full_buffer_ships_a_batch_and_nothing_is_lost(pipe_telemetry):
    import threading

    tel, r = pipe_telemetry
    received: list = []
    # A full pipe blocks the sender (that is the back-pressure), so read from another thread.
    reader = threading.Thread(target=lambda: received.extend(frames_until(r, 3)))
    reader.start()
    n = instrument.DEFAULT_CAPACITY * 2 + 10
    for _ in range(n):
        with instrument.span("sample/env_step"):
            pass
    tel.flush()
    reader.join(10)
    batches = [f for f in received if isinstance(f, wire.Batch)]
    assert len(batches) == 3
    assert sum(len(b.ids) for b in batches) == n


def test_counters_gauges_and_ticks_travel(pipe_telemetry):
    tel, r = pipe_telemetry
    instrument.gauge("loss", 0.5)
    instrument.counter("episodes")
    instrument.tick()
    instrument.tick()
    tel.flush()
    (batch,) = [f for f in frames(r) if isinstance(f, wire.Batch)]
    assert [(c[0], c[2]) for c in batch.counters] == [("loss", 0.5), ("episodes", 1.0)]
    assert len(batch.ticks) == 2 and tel.iteration == 2


def test_spans_off_still_counts_iterations(implementation):
    r, w = mp.Pipe(duplex=False)
    tel = instrument.connect(w, spans_enabled=False, implementation=implementation)
    r.recv_bytes()
    try:
        with instrument.span("update"):
            pass
        instrument.tick()
        tel.flush()
        (batch,) = [f for f in frames(r) if isinstance(f, wire.Batch)]
        assert len(batch.ids) == 0 and len(batch.ticks) == 1
    finally:
        instrument.disconnect()


def test_without_a_monitor_spans_do_nothing():
    instrument.disconnect()
    tel = instrument.telemetry()
    # Every phase gets the one do-nothing span: no name is registered, nothing is buffered.
    assert instrument.span("update") is instrument.span("update/critic") is tel._null_span
    with instrument.span("update"):
        with instrument.span("update/critic"):
            pass
    instrument.tick()
    tel.flush()
    assert tel.sink is None and not tel.spans_enabled
    assert tel._spans == {} and tel._new_names == [] and tel.spans_buffered == 0 and tel.spans_sent == 0


def test_the_c_spans_are_built_where_a_compiler_was_there():
    # Without this the install could fall back to the Python spans unnoticed (setup.py marks
    # the extension optional) and every process would pay ~4x more per span in situ.
    if sys.platform != "linux" or shutil.which("cc") is None:
        pytest.skip("the C spans are built on Linux with a C compiler only")
    assert "c" in instrument.IMPLEMENTATIONS


def test_both_implementations_record_the_same_spans():
    # One script of nested spans, a span ended twice over the buffer's end, and an exception
    # leaving a span: identical ids, parents and order from each implementation.
    def script(tel: instrument.Telemetry) -> None:
        a, b, c = tel.span("update"), tel.span("update/comm/gnn"), tel.span("update/critic")
        for k in range(7):
            with a:
                with b:
                    with b:
                        pass
                if k % 2:
                    with c:
                        pass
        with pytest.raises(ValueError), c:
            raise ValueError
        assert tel._buf.depth == 0

    got = {}
    for impl in sorted(instrument.IMPLEMENTATIONS):
        r, w = mp.Pipe(duplex=False)
        tel = instrument.Telemetry(w, implementation=impl, capacity=5)
        script(tel)
        tel.flush()
        out = [f for f in frames(r) if isinstance(f, wire.Batch)]
        got[impl] = ([list(f.ids) for f in out], [list(f.parents) for f in out],
                     [bool((f.t1 >= f.t0).all()) for f in out])
    assert len(set(map(repr, got.values()))) == 1, got
    ids, parents, ordered = got["python"]
    assert [len(x) for x in ids] == [5] * 5 and all(ordered)  # 7 x 3 + 3 + 1 spans
    assert parents[0][:3] == [1, 0, -1]  # inner gnn in outer gnn, outer gnn in update, update at the top


def test_ending_a_span_that_was_never_started_is_an_error(implementation):
    tel = instrument.Telemetry(mp.Pipe(duplex=False)[1], implementation=implementation)
    with pytest.raises(RuntimeError, match="never started"):
        tel.span("update").__exit__(None, None, None)


@pytest.mark.parametrize("frame", [b"", b"X123", b"J{not json", b"B\x05\x00\x00\x00{}", b"J[1, 2]"])
def test_malformed_frames_are_protocol_errors(frame):
    with pytest.raises(wire.ProtocolError):
        wire.decode(frame)


@pytest.mark.parametrize("bad", ["lengths", "types", "empty", "on_full"])
def test_a_span_buffer_refuses_bad_buffers(implementation, bad):
    from array import array

    buffer_type = instrument.IMPLEMENTATIONS[implementation][0]
    ints, longs = (lambda n: array("i", bytes(4 * n))), (lambda n: array("q", bytes(8 * n)))
    args = {"lengths": (ints(4), ints(4), longs(4), longs(3), print),
            "types": (ints(4), ints(4), ints(4), longs(4), print),
            "empty": (ints(0), ints(0), longs(0), longs(0), print),
            "on_full": (ints(4), ints(4), longs(4), longs(4), None)}[bad]
    if implementation == "python" and bad in ("types", "on_full"):
        pytest.skip("the Python buffers take any sequences; the C ones check what they write into")
    with pytest.raises((TypeError, ValueError)):
        buffer_type(*args)
    ids = args[0]
    ids.append(1)  # an array whose buffer is still exported cannot grow: released after the failure


# -- threads -----------------------------------------------------------------------------------
def _spans_by_name(batches: list) -> list[tuple[str, str | None]]:
    """(name, parent name) of every span in the batches, the phase table rebuilt as a reader does."""
    names: list[str] = []
    out = []
    for b in batches:
        names.extend(b.new_names)
        out += [(names[i], names[p] if p >= 0 else None) for i, p in zip(b.ids, b.parents, strict=True)]
    return out


def test_two_threads_nest_their_spans_each_on_their_own(pipe_telemetry):
    import threading

    tel, r = pipe_telemetry
    # Span objects made in the main thread, used from both threads (a held span works anywhere).
    sample, step = tel.span("sample"), tel.span("sample/env_step")
    update, backward = tel.span("update"), tel.span("update/backward")
    a_open, b_open = threading.Event(), threading.Event()
    rounds = 50

    def a() -> None:
        for _ in range(rounds):
            with sample:
                a_open.set()
                b_open.wait(5)  # B is inside `update` now: its spans interleave with ours
                b_open.clear()
                with step:
                    a_open.set()
                    b_open.wait(5)
                    b_open.clear()

    def b() -> None:
        for _ in range(rounds):
            a_open.wait(5)
            a_open.clear()
            with update:
                b_open.set()
                a_open.wait(5)
                a_open.clear()
                with backward:
                    b_open.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    tel.flush()
    got = _spans_by_name([f for f in frames(r) if isinstance(f, wire.Batch)])
    assert sorted(set(got)) == [("sample", None), ("sample/env_step", "sample"),
                                ("update", None), ("update/backward", "update")], set(got)
    assert len(got) == 4 * rounds  # every thread's spans shipped as its thread ended


def test_a_thread_ships_its_spans_when_it_ends(pipe_telemetry):
    import threading

    tel, r = pipe_telemetry

    def work() -> None:
        with instrument.span("sample"):
            with instrument.span("sample/env_step"):
                pass

    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    # No flush from here: the ending thread shipped its own buffer, and the root forgot it.
    got = _spans_by_name([f for f in frames(r) if isinstance(f, wire.Batch)])
    assert got == [("sample/env_step", "sample"), ("sample", None)]
    if tel.implementation == "c":
        assert tel._buf.threads == {}


def test_spans_ship_after_the_flush_interval_without_ticks(implementation):
    r, w = mp.Pipe(duplex=False)
    tel = instrument.Telemetry(w, implementation=implementation, flush_interval_s=0.05)
    try:
        sp = tel.span("sample/env_step")
        with sp:
            pass
        assert not r.poll(0.01)  # one span, no tick: buffered
        time.sleep(0.06)
        with sp:
            pass  # ends past the deadline: the buffer ships
        (batch,) = [f for f in frames(r) if isinstance(f, wire.Batch)]
        assert len(batch.ids) == 2
    finally:
        tel.close()


def test_a_span_left_open_inside_another_is_dropped_when_the_outer_one_ends(implementation):
    # A hook whose closing half never ran (the optimizer step raised): the enclosing span still
    # ends as itself, and the frame left open is not recorded.
    r, w = mp.Pipe(duplex=False)
    tel = instrument.Telemetry(w, implementation=implementation)
    try:
        outer, leaked, after = tel.span("update"), tel.span("update/optimizer"), tel.span("sample")
        with outer:
            leaked.__enter__()
        with after:
            pass
        leaked.__enter__()
        leaked.abandon()  # the next step's hook drops the leftover frame before opening its own
        assert tel._buf.depth == 0
        tel.flush()
        got = _spans_by_name([f for f in frames(r) if isinstance(f, wire.Batch)])
        assert got == [("update", None), ("sample", None)]
    finally:
        tel.close()
