"""IPS of a `--no-spans` run must be comparable with an instrumented one (the overhead figure)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from marlwatch.collector import event_row
from marlwatch.metrics import Metrics
from marlwatch.recording import SCHEMA, RunInfo

S = 1_000_000_000


def _iters(times_s: list[float]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [{"kind": "iter", "proc": 0, "t_ns": int(t * S), "iter": i + 1} for i, t in enumerate(times_s)], schema=SCHEMA)


def _span(t_s: float, dur_s: float) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([{"kind": "span", "proc": 0, "name": "update", "t_ns": int(t_s * S),
                                        "dur_ns": int(dur_s * S), "iter": 0}], schema=SCHEMA)


@pytest.mark.parametrize("spans", [True, False])
def test_start_up_is_apart_and_ips_the_same_with_or_without_spans(spans):
    # Processes take 5 s to start (imports); then 10 iterations, one a second.
    info = RunInfo("maddpg", "simple_spread", 3, 1, 0, 10, spans=spans, procs={"0": "learner"})
    m = Metrics(info)
    m.add(event_row(5 * S, 0, "started", role="learner", pid=1, core=0))
    if spans:
        m.add(_span(5.0, 0.5))
    m.add(_iters([5.0 + k for k in range(1, 11)]))
    snap = m.snapshot()
    # The first iteration ends 6 s after the run started: that is start-up; the other nine took 9 s.
    assert snap.startup_s == pytest.approx(6.0) and snap.wall_s == pytest.approx(15.0)
    assert snap.steady_s == pytest.approx(9.0) and snap.ips == pytest.approx(1.0)
    assert len(m.iteration_latencies_ns()) == 9 and m.iteration_latencies_ns() == pytest.approx([S] * 9)
    assert snap.iteration_ms["p99"] == pytest.approx(1000.0)
