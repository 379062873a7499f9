"""`--auto-flame`: when to profile without being asked: once, when a phase becomes the hottest or
its p95 jumps.

It compares short windows of the run (a fresh Metrics each) with the first window after
start-up, so that a jump shows as soon as it happens, even hours into a run, where whole-run
figures would hardly move.
"""

from __future__ import annotations

import math
import time

import pyarrow as pa

from marlwatch.metrics import Metrics
from marlwatch.recording import RunInfo

# The length of the windows compared, and how much a phase's p95 must grow (and by at least
# 1 ms) over the first window's to count as a jump.
AUTO_WINDOW_S = 2.0
AUTO_P95_JUMP = 1.5


class AutoTrigger:
    """Fed every batch of a run; `check()` says once which phase to profile, and why."""

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.fired = False
        self._metrics: Metrics | None = Metrics(info)
        self._windows = 0
        self._baseline: dict[str, float] | None = None
        self._hottest: str | None = None
        self._candidate: str | None = None
        self._next_check = time.monotonic() + AUTO_WINDOW_S

    def add(self, batch: pa.RecordBatch) -> None:
        if self._metrics is not None:
            self._metrics.add(batch)

    def due(self) -> bool:
        return not self.fired and time.monotonic() >= self._next_check

    def check(self) -> tuple[str, str] | None:
        """Close the current window and compare it with the baseline window: (phase, reason)
        the first time one differs enough, else None."""
        self._next_check = time.monotonic() + AUTO_WINDOW_S
        m = self._metrics
        if m is None:
            return None
        snap = m.snapshot()
        self._metrics = Metrics(self.info)
        self._windows += 1
        if self._windows == 1 or snap.iterations < 5:
            return None  # start-up (imports, first iterations) would look like jumps
        hottest = snap.hottest.name if snap.hottest else None
        p95 = {p.name: p.p95_ms for p in snap.phases if p.count >= 10 and not math.isnan(p.p95_ms)}
        if self._baseline is None:
            self._baseline, self._hottest = p95, hottest
            return None
        fired: tuple[str, str] | None = None
        # A new hottest phase counts once it holds for two windows in a row (not one noisy window).
        if hottest is not None and hottest != self._hottest and hottest == self._candidate:
            fired = hottest, f"'{hottest}' became the hottest phase (was '{self._hottest}')"
        self._candidate = hottest if hottest != self._hottest else None
        if fired is None:
            for name, now in sorted(p95.items(), key=lambda kv: -kv[1]):
                before = self._baseline.get(name)
                if before is None:
                    self._baseline[name] = now  # a phase that started later: its first window
                elif now > AUTO_P95_JUMP * before and now - before > 1.0:
                    fired = name, f"p95 of '{name}' jumped from {before:.1f} to {now:.1f} ms"
                    break
        if fired is not None:
            self.fired = True
            self._metrics = None  # no longer needed
        return fired
