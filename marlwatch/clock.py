"""One timeline across machines: each process's clock offset to the monitor's.

Spans carry the sender's `perf_counter_ns` (CLOCK_MONOTONIC). On one machine every process reads
the same clock; on another machine that clock started at another boot and the numbers mean
nothing to the monitor. So the monitor estimates, per connection, how far the process's clock is
from its own, by round trips over the telemetry socket (NTP's method, Cristian's algorithm):

    monitor sends ``{"type": "clock_req", "seq": k}`` at its time T1
    the process answers ``{"type": "clock_resp", "seq": k, "t_ns": t}`` (its clock, at once)
    the monitor reads the answer at its time T4:  rtt = T4 - T1,  offset = t - (T1 + T4) / 2

If the answer was stamped anywhere inside the round trip, the offset is off by at most rtt / 2;
of a burst of samples the one with the smallest round trip is kept (it waited least in queues,
so its bound is the tightest). A burst runs when a process connects and again every
`RESYNC_S`; the newest estimate is applied to what the process sends from then on (where rows
are made: `ProcStream.t_origin_ns`), so every reader of the recording (live panels, replay,
export, flame attribution) sees one timeline, and each estimate is recorded as a ``clock`` event.

A process says it can answer by a ``clock`` object in its hello (``{"v": 1, "boot_id": ...}``);
a process without it (older marlwatch) is taken as sharing the monitor's clock (offset 0), as
are old recordings, which have no ``clock`` events. When the hello's boot id is the monitor's,
the two read the same clock: the offset applied is exactly 0, and the estimate is still made and
recorded, which measures the method's own error (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BURST = 5  # round trips per estimate
RESYNC_S = 30.0  # a new estimate this often (clock rates differ by a few ppm: ~0.1 ms per 30 s at worst)
REPLY_TIMEOUT_S = 2.0  # a request unanswered this long is given up and the next one sent
SETTLE_S = 3.0  # how long a new connection's rows wait for its first estimate before going out unaligned
PROTOCOL = 1


def boot_id() -> str | None:
    """This machine's boot id (Linux): equal boot ids mean one CLOCK_MONOTONIC."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    return None


def capability() -> dict[str, Any]:
    """What a process puts in its hello under ``clock``: it answers clock requests."""
    return {"v": PROTOCOL, "boot_id": boot_id()}


@dataclass(frozen=True)
class Estimate:
    offset_ns: int  # process clock minus monitor clock
    rtt_ns: int  # round trip of the sample kept: |error| <= rtt / 2
    samples: int


class ClockSync:
    """The monitor's side for one connection: when to ask, and what the answers say."""

    def __init__(self, now_ns: int, *, same_clock: bool, hello_t_ns: int | None = None) -> None:
        self.same_clock = same_clock
        self.estimate: Estimate | None = None
        # Until the first estimate: the hello's own stamp, read on arrival (off by its one-way
        # delay, milliseconds), so that even a process that never answers gets a usable timeline.
        self.provisional_ns = hello_t_ns - now_ns if hello_t_ns is not None else 0
        self._seq = 0
        self._sent: tuple[int, int] | None = None  # (seq, T1) of the request in flight
        self._burst: list[tuple[int, int]] = []  # (rtt, offset) of this burst
        self._next_burst_ns = now_ns
        self.started_ns = now_ns

    @property
    def applied_ns(self) -> int:
        """The offset applied to this process's times (0 on the monitor's own clock)."""
        if self.same_clock:
            return 0
        return self.estimate.offset_ns if self.estimate is not None else self.provisional_ns

    def settled(self, now_ns: int) -> bool:
        """Whether rows can go out: the first estimate is in (or not needed, or waited for too long)."""
        return self.same_clock or self.estimate is not None or now_ns - self.started_ns > SETTLE_S * 1e9

    def request(self, now_ns: int) -> dict[str, Any] | None:
        """The request to send now, if one is due."""
        if self._sent is not None:
            if now_ns - self._sent[1] < REPLY_TIMEOUT_S * 1e9:
                return None
            self._sent = None  # lost or stuck behind a slow process: ask again
        if not self._burst and now_ns < self._next_burst_ns:
            return None
        self._seq += 1
        self._sent = (self._seq, now_ns)
        return {"type": "clock_req", "seq": self._seq}

    def response(self, seq: Any, t_proc: Any, now_ns: int) -> Estimate | None:
        """An answer read at `now_ns`; returns the new estimate when it completes a burst."""
        if self._sent is None or seq != self._sent[0] or not isinstance(t_proc, int):
            return None
        t1 = self._sent[1]
        self._sent = None
        self._burst.append((now_ns - t1, t_proc - (t1 + now_ns) // 2))
        if len(self._burst) < BURST:
            return None
        rtt, offset = min(self._burst)
        self.estimate = Estimate(offset, rtt, len(self._burst))
        self._burst = []
        self._next_burst_ns = now_ns + int(RESYNC_S * 1e9)
        return self.estimate


class Responder:
    """The process's side: a thread that answers the monitor's clock requests on `conn` (the
    telemetry socket, whose other direction nobody else reads), sending through `send` (the
    Telemetry's locked sender). It ends when the connection does."""

    def __init__(self, conn: Any, send: Any) -> None:
        self.conn = conn
        self.send = send
        self.thread = threading.Thread(target=self._serve, name="marlwatch-clock", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import json

        from marlwatch.wire import encode_control

        now = time.perf_counter_ns
        while True:
            try:
                frame = self.conn.recv_bytes(4096)
                t = now()
            except (EOFError, OSError, ValueError, TypeError, AttributeError):
                return  # closed by either side
            if frame[:1] != b"J":
                continue
            try:
                msg = json.loads(frame[1:])
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("type") == "clock_req":
                self.send(encode_control({"type": "clock_resp", "seq": msg.get("seq"), "t_ns": t}))
