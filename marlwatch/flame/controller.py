"""The py-spy controller of a live run: takes requests (`--flame`, the app's `f` key, the auto
trigger), waits until the phase does real work, runs py-spy on the processes that run it, and
writes the attributed samples into the recording."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.collector import event_row
from marlwatch.flame import DEFAULT_RATE, DEFAULT_SECONDS, pyspy
from marlwatch.flame.align import attribute
from marlwatch.flame.auto import AutoTrigger
from marlwatch.metrics import Warmup, in_phase, top_segment, with_warmup_gauge
from marlwatch.monitor import ProcState
from marlwatch.phase_activity import REAL_WORK_SHARE, WINDOW_S, PhaseActivity, Share
from marlwatch.recording import COUNTER, ITER, SPAN, RunInfo
from marlwatch.report import percent, warming_up

SPAN_WAIT_S = 10.0  # how long to wait for a process's spans covering the sampled window
WAIT_REPORT_S = 10.0  # while a request waits for real work, say so this often


class Watched(Protocol):
    """What the controller needs of the run it profiles: a Monitor, or a Run (which has its monitor's)."""

    @property
    def info(self) -> RunInfo: ...

    @property
    def listeners(self) -> list[Callable[[pa.RecordBatch], None]]: ...

    @property
    def hooks(self) -> list[Callable[[bool], None]]: ...

    @property
    def procs(self) -> Mapping[int, ProcState]: ...

    def now_ns(self) -> int: ...

    def emit(self, batch: pa.RecordBatch) -> None: ...


@dataclass
class _Session:
    slot: int
    pid: int
    proc: subprocess.Popen
    out: Path
    t_launch_ns: int
    t_end_ns: int | None = None
    events: list[dict[str, Any]] | None = None
    error: str | None = None
    last_tick_ns: int = -1  # the latest iteration end seen from this process


@dataclass
class FlameRequest:
    phase: str
    seconds: float = DEFAULT_SECONDS
    reason: str = "requested"
    replace: bool = False  # drop waiting requests of the same reason (the app's `f` key: the latest wins)
    # While it waits for its phase to do real work (marlwatch.phase_activity):
    since: float | None = None  # monotonic time it was taken in
    said_at: float | None = None  # when the last waiting message was given
    said: str | None = None  # what the last waiting message said: "absent" (no process ran it) or "share"
    max_share: float = 0.0  # the largest top-level share seen while waiting


@dataclass
class _Capture:
    request: FlameRequest
    sessions: list[_Session]
    spans: dict[int, list[tuple[int, int, str, int, bool]]] = field(default_factory=lambda: defaultdict(list))
    t_start_ns: int = 0
    ended_at: float | None = None  # monotonic time py-spy was done (waiting for spans from then on)


class FlameController:
    """Runs py-spy on a live `Run` on request (`request()`, `--flame`, the app's `f` key) or
    automatically (`auto=True`: once, when a phase becomes the hottest or its p95 jumps).

    It plugs into the run with a listener (to see which processes run a phase and to keep the
    spans of the sampled window) and a hook that `Run.pump()` calls after each pump and
    `Run.finish()` calls with final=True. Everything runs in the thread that pumps the run.
    """

    def __init__(self, run: Watched, *, rate: int = DEFAULT_RATE, auto: bool = False,
                 auto_seconds: float = DEFAULT_SECONDS, on_message: Callable[[str], None] | None = None) -> None:
        self.run = run
        self.rate = rate
        self.auto = AutoTrigger(run.info) if auto else None
        self.auto_seconds = auto_seconds
        self.on_message = on_message
        self.messages: list[str] = []
        self.incoming: deque[FlameRequest] = deque()  # from any thread; taken in by poll()
        self.pending: list[FlameRequest] = []  # taken in, waiting for a process or for real work
        # Top-level spans and iteration ends while a request is pending (None when none is): the "does
        # it do real work" rule of marlwatch.phase_activity.
        self.activity: PhaseActivity | None = None
        self.warmup: Warmup | None = None  # the run's warm-up, where it reports one (seen while tracking)
        self.capture: _Capture | None = None
        self.done: list[dict[str, Any]] = []  # one summary per finished capture
        self.phase_slots: dict[str, set[int]] = defaultdict(set)
        run.listeners.append(self.on_batch)
        run.hooks.append(self.poll)

    # -- requests ----------------------------------------------------------------------------
    def request(self, phase: str, seconds: float = DEFAULT_SECONDS, reason: str = "requested",
                replace: bool = False) -> None:
        """Profile `phase` for `seconds` once a process runs it and it does real work
        (marlwatch.phase_activity); one capture at a time. `replace`: drop requests of the same
        `reason` that are still waiting.

        May be called from any thread (the live app's UI thread): it only appends to a deque that
        the run's thread takes from in `poll()`."""
        self.incoming.append(FlameRequest(phase, seconds, reason, replace))

    @property
    def busy(self) -> bool:
        return self.capture is not None

    def _say(self, text: str) -> None:
        self.messages.append(text)
        if self.on_message is not None:
            self.on_message(text)

    # -- listener ----------------------------------------------------------------------------
    def on_batch(self, batch: pa.RecordBatch) -> None:
        if self.auto is not None:
            self.auto.add(batch)
        if not self.pending and not self.incoming and self.capture is None:
            return  # idle (the live app always has a controller for its `f` key): costs nothing
        kind = batch.column("kind")
        is_span = pc.equal(kind, SPAN).to_numpy(zero_copy_only=False)
        if self.pending or self.incoming:
            self._track_activity(batch, kind, is_span)
        if is_span.any():
            # Which process runs which phase: distinct (proc, name) pairs with numpy, without
            # copying the batch (this runs for every batch of a run, profiled or not).
            enc = pc.dictionary_encode(batch.column("name"))
            codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            procs = batch.column("proc").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            pairs = np.unique((procs[is_span] << 32) | (codes[is_span] & 0xFFFFFFFF))
            names = enc.dictionary.to_pylist()
            for key in pairs.tolist():
                slot, code = key >> 32, key & 0xFFFFFFFF
                if slot >= 0 and code != 0xFFFFFFFF:
                    self.phase_slots[names[code]].add(slot)
        cap = self.capture
        if cap is None:
            return
        slots = {s.slot for s in cap.sessions}
        if is_span.any():
            spans = batch.filter(pa.array(is_span))
            for slot, name, parent, t, dur, it in zip(
                    *(spans.column(c).to_pylist() for c in ("proc", "name", "parent", "t_ns", "dur_ns", "iter")),
                    strict=True):
                if slot in slots and t + dur >= cap.t_start_ns:
                    cap.spans[slot].append((t, dur, name, it, parent is None))
        iters = batch.filter(pc.equal(kind, ITER))
        if iters.num_rows:
            for slot, t in zip(iters.column("proc").to_pylist(), iters.column("t_ns").to_pylist(), strict=True):
                for s in cap.sessions:
                    if s.slot == slot:
                        s.last_tick_ns = max(s.last_tick_ns, t)

    def _track_activity(self, batch: pa.RecordBatch, kind: pa.Array, is_span: np.ndarray) -> None:
        """Top-level spans and iteration ends, for the real-work rule (marlwatch.phase_activity)."""
        if self.activity is None:
            self.activity = PhaseActivity()

        def ints(c: str, mask: np.ndarray) -> np.ndarray:
            return batch.column(c).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)[mask]

        top = is_span & pc.is_null(batch.column("parent")).to_numpy(zero_copy_only=False)
        if top.any():
            enc = pc.dictionary_encode(batch.column("name"))
            codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)[top]
            ok = codes >= 0
            self.activity.add_spans(ints("proc", top)[ok], enc.dictionary.to_pylist(), codes[ok],
                                    ints("t_ns", top)[ok], ints("dur_ns", top)[ok])
        ticks = pc.equal(kind, ITER).to_numpy(zero_copy_only=False)
        if ticks.any():
            self.activity.add_ticks(ints("proc", ticks), ints("t_ns", ticks))
        gauges = batch.filter(pc.equal(kind, COUNTER))
        for name, t, value in zip(*(gauges.column(c).to_pylist() for c in ("name", "t_ns", "value")), strict=True):
            if name is not None and t is not None and value is not None:
                self.warmup = with_warmup_gauge(self.warmup, name, value, t)

    def slots_for(self, phase: str) -> list[int]:
        return sorted({slot for name, slots in self.phase_slots.items() if in_phase(name, phase) for slot in slots})

    # -- hook --------------------------------------------------------------------------------
    def poll(self, final: bool = False) -> None:
        self._take_incoming()
        if self.capture is not None:
            self._advance(final)
        if final:
            for req in self.pending:
                self._give_up(req)
            self.pending.clear()
            return
        if self.capture is None and self.auto is not None and self.auto.due():
            fired = self.auto.check()
            if fired is not None:
                phase, reason = fired
                self._say(f"flame: auto: {reason}; profiling it for {self.auto_seconds:g} s")
                self.pending.insert(0, FlameRequest(phase, self.auto_seconds, f"auto: {reason}"))
        if not self.pending:
            self.activity = None  # nothing waits: stop keeping top-level time
            return
        ready = None
        for req in self.pending:
            if self._ready(req) and ready is None and self.capture is None:
                ready = req
        if ready is not None:
            self.pending.remove(ready)
            self._start(ready, self.slots_for(ready.phase))

    def _take_incoming(self) -> None:
        while self.incoming:
            req = self.incoming.popleft()
            req.since = time.monotonic()
            if req.replace:
                for old in [r for r in self.pending if r.reason == req.reason]:
                    self.pending.remove(old)
                    self._say(f"flame: no longer waiting for '{old.phase}' ('{req.phase}' was asked for since)")
            self.pending.append(req)

    def _roles(self, slots: list[int]) -> str:
        return " + ".join(self.run.procs[s].role if s in self.run.procs else f"slot {s}" for s in slots)

    def _ready(self, req: FlameRequest) -> bool:
        """Whether `req`'s phase runs and does real work now; says so while it waits (at once,
        then every WAIT_REPORT_S)."""
        slots = self.slots_for(req.phase)
        share = self.activity.share(req.phase, slots) if self.activity is not None and slots else None
        if share is not None:
            req.max_share = max(req.max_share, share.share)
            if share.share >= REAL_WORK_SHARE:
                return True
        now = time.monotonic()
        kind = "share" if share is not None else "absent"
        # Said at once when there is news (the phase runs now), else every WAIT_REPORT_S.
        if req.said == kind and req.said_at is not None and now - req.said_at < WAIT_REPORT_S:
            return False
        waited = now - (req.since or now)
        if share is not None:
            top = top_segment(req.phase)
            what = f"'{req.phase}'" if top == req.phase else f"'{req.phase}' ('{top}')"
            state = (f"{top}: {self._share_text(share, slots)}; profiling starts at {100 * REAL_WORK_SHARE:g}%")
            lead = "still waiting" if req.said == "share" else "waiting"
            self._say(f"flame: {lead} for {what} to do real work before profiling it "
                      f"({state}; {self._progress(waited)})")
        elif self.activity is not None and self.activity.running_s() >= WINDOW_S and req.said is None:
            self._say(f"flame: waiting for a process to run '{req.phase}' (none has so far)")
        else:
            return False  # nothing known yet (start-up), or said already: say nothing
        req.said, req.said_at = kind, now
        return False

    def _share_text(self, share: Share, slots: list[int]) -> str:
        if share.iterations:
            return f"{percent(share.share, keep_small=True)} of {self._roles(slots)} iteration time, median of the last {share.iterations}"
        return f"{percent(share.share, keep_small=True)} of {self._roles(slots)} time over {share.window_s:g} s"

    def _progress(self, waited_s: float) -> str:
        """How far the wait is: the run's warm-up where it reports one, and the time waited."""
        w = self.warmup
        warm = f"{warming_up(w)} ({100 * w.done / w.needed:.0f}%), " if w is not None and w.active else ""
        return f"{warm}waited {waited_s:.0f} s"

    def _give_up(self, req: FlameRequest) -> None:
        """The run ended while `req` waited."""
        slots = self.slots_for(req.phase)
        if not slots:
            seen = sorted({top_segment(p) for p in self.phase_slots})
            why = f"no process ran '{req.phase}'" + (f" (phases seen: {', '.join(seen)}; is the name right?)"
                                                      if seen else "")
        else:
            top = top_segment(req.phase)
            why = (f"'{req.phase}' never did real work ('{top}' took at most {percent(req.max_share, keep_small=True)} of "
                   f"{self._roles(slots)} time; a capture needs {100 * REAL_WORK_SHARE:g}%)")
        self.run.emit(event_row(self.run.now_ns(), None, "flame_skipped", phase=req.phase, reason=why,
                                max_share=req.max_share))
        hint = "; a longer run (--iterations) gives it time" if slots else ""
        self._say(f"flame: the run ended before profiling '{req.phase}': {why}; nothing was profiled{hint}")

    def _start(self, req: FlameRequest, slots: list[int]) -> None:
        cmd = pyspy.pyspy_command()
        run = self.run
        cap = _Capture(req, [], t_start_ns=run.now_ns())
        tmp = Path(tempfile.mkdtemp(prefix="marlwatch-flame-"))
        for slot in slots:
            st = run.procs.get(slot)
            pid = st.pid if st is not None else None
            role = st.role if st is not None else f"slot {slot}"
            if not cmd:
                self._fail(slot, pid, role, "py-spy not found (pip install py-spy, or set MARLWATCH_PYSPY)")
                continue
            if st is not None and not getattr(st, "same_machine", True):
                self._fail(slot, pid, role, f"it runs on another machine ({st.node or 'another node'}); py-spy can "
                                            "only attach to processes on the monitor's machine")
                continue
            if pid is None or (st is not None and st.exitcode is not None):
                self._fail(slot, pid, role, "process gone")
                continue
            out = tmp / f"slot{slot}.json"
            t_launch = run.now_ns()  # py-spy's clock starts just after this (docs/flame.md)
            try:
                proc = pyspy.start(pid, self.rate, req.seconds, out)
            except OSError as e:
                self._fail(slot, pid, role, f"cannot start py-spy: {e.strerror or e}")
                continue
            cap.sessions.append(_Session(slot, pid, proc, out, t_launch))
        if not cap.sessions:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        self.capture = cap
        roles = ", ".join(run.procs[s.slot].role for s in cap.sessions)
        run.emit(event_row(cap.t_start_ns, None, "flame_started", phase=req.phase, seconds=req.seconds,
                            rate=self.rate, slots=[s.slot for s in cap.sessions], reason=req.reason))
        waited = f" (it does real work now; {self._progress(time.monotonic() - req.since)})" \
            if req.said_at is not None and req.since is not None else ""
        self._say(f"flame: profiling '{req.phase}' in {roles} for {req.seconds:g} s at {self.rate} Hz{waited}")

    def _fail(self, slot: int, pid: int | None, role: str, why: str) -> None:
        self.run.emit(event_row(self.run.now_ns(), slot, "flame_failed", pid=pid, error=why))
        who = f"{role} (pid {pid})" if pid is not None else role
        self._say(f"flame: py-spy could not profile {who}: {why}; the run goes on")

    def _advance(self, final: bool) -> None:
        cap = self.capture
        assert cap is not None
        for s in cap.sessions:
            if s.events is not None or s.error is not None:
                continue
            if final and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
                try:
                    s.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait()
            if s.proc.poll() is None:
                continue
            s.t_end_ns = self.run.now_ns()
            err = s.proc.stderr.read() if s.proc.stderr else ""
            if s.proc.returncode != 0 or not s.out.exists():
                s.error = pyspy.error_text(err, s.proc.returncode)
                continue
            try:
                data = json.loads(s.out.read_text())
                s.events = data if isinstance(data, list) else data.get("traceEvents", [])
            except (OSError, ValueError) as e:
                s.error = f"unreadable py-spy output ({e})"
        if any(s.events is None and s.error is None for s in cap.sessions):
            return
        if cap.ended_at is None:
            cap.ended_at = time.monotonic()
        # Spans arrive when their process flushes; an iteration that ended after the sampled
        # window means every span that started inside it has arrived.
        waiting = [s for s in cap.sessions if s.events is not None
                   and s.last_tick_ns < (s.t_end_ns or 0)
                   and self.run.procs[s.slot].exitcode is None]
        if waiting and not final and time.monotonic() - cap.ended_at < SPAN_WAIT_S:
            return
        self._finish_capture(cap)

    def _finish_capture(self, cap: _Capture) -> None:
        self.capture = None
        total, unattributed = 0, 0
        phases: Counter = Counter()
        alignment: dict[str, dict[str, float | None]] = {}
        for s in cap.sessions:
            role = self.run.procs[s.slot].role
            if s.error is not None:
                self._fail(s.slot, s.pid, role, s.error)
                continue
            samples = pyspy.samples_from_chrometrace(s.events or [], self.rate, s.t_launch_ns)
            batch, lost, alignment[str(s.slot)] = attribute(s.slot, samples, cap.spans.get(s.slot, []), self.rate)
            total += len(samples.t_ns) - lost
            unattributed += lost
            if batch.num_rows:
                self.run.emit(batch)
                for name, count in zip(batch.column("name").to_pylist(), batch.column("value").to_pylist(),
                                       strict=True):
                    phases[name] += int(count)
        try:
            if not os.environ.get("MARLWATCH_FLAME_KEEP"):  # debugging: keep py-spy's raw output
                shutil.rmtree(cap.sessions[0].out.parent, ignore_errors=True)
        except (OSError, IndexError):
            pass
        summary = {"phase": cap.request.phase, "samples": total, "unattributed": unattributed,
                   "slots": [s.slot for s in cap.sessions if s.error is None], "phases": dict(phases),
                   "alignment": alignment}
        self.done.append(summary)
        self.run.emit(event_row(self.run.now_ns(), None, "flame_done", **summary))
        if total or unattributed:
            in_req = sum(v for k, v in phases.items() if in_phase(k, cap.request.phase))
            self._say(f"flame: {total} samples stored ({in_req} in '{cap.request.phase}', "
                      f"{unattributed} outside any span)")



