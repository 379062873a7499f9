"""When does a phase do real work? The rule a py-spy capture waits for (docs/flame.md).

A loop can enter a phase long before the phase does anything worth profiling: MADDPG's `update`
runs from iteration 0 but only stores the batch in its replay buffer (~0.1 ms of a ~40-80 ms
iteration) until the warm-up ends. A capture started then samples everything but `update`.

**Rule.** A phase P does real work when the top-level phase it belongs to (`update` for
`update/critic`) took at least REAL_WORK_SHARE of the iteration's time in the median of the
last ITERATIONS iterations (at least MIN_ITERATIONS) of the processes that run P.

- Per iteration, and the median: on a loaded machine a 0.1 ms store is now and then descheduled
  for tens of ms; one such iteration would lift a plain share of a few seconds over the threshold
  (seen: a 67 ms store in a 2 s window of 0.5 s iterations). The median ignores it.
- The top-level phase, not P itself: below the top level a real phase can be short (MADDPG's
  `update/target` is 0.3% of the time at batch 1024) yet only run once the top-level phase does
  real work; the trivial-work pattern (a phase entered, then skipped) is a loop's top level.
  Sub-phases that only run after a warm-up (`update/critic`) are waited for anyway: a capture
  needs a process seen running its phase.
- REAL_WORK_SHARE = 2%: on MADDPG runs here the warm-up `update` took 0.02-0.2% of the
  learner's time, the real one 15% at batch 64 and 21% at batch 256 (the default is 1024): the
  threshold is an order of magnitude from both. At 2%, a 5 s capture at 100 Hz expects at least
  10 samples in the phase.
- A process that reports no iterations (`marlwatch.tick()`, e.g. a user's script that does not
  call it) is judged on its last WINDOW_S seconds of top-level spans instead, once it has run
  NO_TICKS_S seconds without one (a rollout worker may wait seconds for its first weights).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from marlwatch.metrics import top_segment

REAL_WORK_SHARE = 0.02
ITERATIONS = 5
MIN_ITERATIONS = 3
WINDOW_S = 2.0  # processes without iterations: the window their share is taken over
# ... once they have run this long without one (a worker can wait seconds for its first weights).
NO_TICKS_S = 10.0
MAX_SPANS = 20_000  # top-level spans kept per process (a bound for loops without ticks)


@dataclass
class Share:
    """A top-level phase's share of its processes' time: the median over `iterations` iterations
    (0: over the last `window_s` seconds, for processes without iterations)."""

    share: float
    iterations: int
    window_s: float


class PhaseActivity:
    """Recent top-level spans and iteration ends per process (fed with rows of a run)."""

    def __init__(self) -> None:
        # per process: (end_ns, dur_ns, top-level phase) of recent top-level spans, by end time
        self.spans: dict[int, deque[tuple[int, int, str]]] = defaultdict(lambda: deque(maxlen=MAX_SPANS))
        self.ticks: dict[int, deque[int]] = defaultdict(lambda: deque(maxlen=ITERATIONS + 1))
        self.first_ns: dict[int, int] = {}

    def add_spans(self, slots: np.ndarray, names: list[str], codes: np.ndarray, t_ns: np.ndarray,
                  dur_ns: np.ndarray) -> None:
        """Top-level spans: process slot, name code into `names`, start and duration (ns)."""
        tops = [top_segment(n) for n in names]
        end = t_ns + dur_ns
        for k in np.argsort(end, kind="stable").tolist():
            slot = int(slots[k])
            self.spans[slot].append((int(end[k]), int(dur_ns[k]), tops[int(codes[k])]))
            if slot not in self.first_ns or t_ns[k] < self.first_ns[slot]:
                self.first_ns[slot] = int(t_ns[k])

    def add_ticks(self, slots: np.ndarray, t_ns: np.ndarray) -> None:
        """Iteration ends: process slot and time (ns)."""
        for k in np.argsort(t_ns, kind="stable").tolist():
            self.ticks[int(slots[k])].append(int(t_ns[k]))
        for slot, ticks in self.ticks.items():  # spans of iterations no longer kept go
            spans = self.spans.get(slot)
            if spans is not None and len(ticks) == ticks.maxlen:
                while spans and spans[0][0] <= ticks[0]:
                    spans.popleft()

    def running_s(self) -> float:
        """How long the longest-seen process has run top-level spans (while tracked)."""
        return max((s[-1][0] - self.first_ns[slot] for slot, s in self.spans.items() if s), default=0) / 1e9

    def share(self, phase: str, slots: list[int]) -> Share | None:
        """The share of `phase`'s top-level phase in `slots`' recent time; None until known."""
        top = top_segment(phase)
        per_iteration: list[float] = []
        busy = window = 0
        for slot in slots:
            spans, ticks = self.spans.get(slot), list(self.ticks.get(slot, ()))
            if not spans:
                continue
            if len(ticks) >= 2:
                # Iteration i is (ticks[i-1], ticks[i]]; a span counts in the one it ends in.
                ends = np.array([s[0] for s in spans], np.int64)
                durs = np.array([s[1] if s[2] == top else 0 for s in spans], np.int64)
                edges = np.searchsorted(ends, np.array(ticks, np.int64), side="right")
                for i in range(1, len(ticks)):
                    length = ticks[i] - ticks[i - 1]
                    if length > 0:
                        per_iteration.append(int(durs[edges[i - 1]:edges[i]].sum()) / length)
            elif spans[-1][0] - self.first_ns[slot] >= NO_TICKS_S * 1e9 and not ticks:
                last = spans[-1][0]
                lo = last - int(WINDOW_S * 1e9)
                busy += sum(d for e, d, t in spans if t == top and e > lo)
                window += int(WINDOW_S * 1e9)
        if len(per_iteration) >= MIN_ITERATIONS:
            return Share(min(1.0, float(np.median(per_iteration))), len(per_iteration), 0.0)
        if window:
            return Share(min(1.0, busy / window), 0, WINDOW_S)
        return None

    def real_work(self, phase: str, slots: list[int]) -> bool:
        s = self.share(phase, slots)
        return s is not None and s.share >= REAL_WORK_SHARE
