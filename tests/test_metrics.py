"""The metric definitions (docs/metrics.md), on hand-made rows with known answers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from marlwatch.metrics import _N_BINS, Metrics, _bins, is_comm, quantiles_from_hist
from marlwatch.recording import SCHEMA

MS = 1_000_000


def rows(*records: dict) -> pa.RecordBatch:
    cols = {name: [r.get(name) for r in records] for name in SCHEMA.names}
    return pa.RecordBatch.from_pydict(cols, schema=SCHEMA)


def span(proc, name, parent, t, dur, it=0):
    return {"kind": "span", "proc": proc, "name": name, "parent": parent, "t_ns": t, "dur_ns": dur, "iter": it}


def tick(proc, t, it):
    return {"kind": "iter", "proc": proc, "t_ns": t, "iter": it}


def test_shares_comm_and_ips():
    m = Metrics()
    m.add(rows(
        # learner: 10 ms update (4 ms of it communication, 1 ms nested deeper), 10 ms waiting
        span(0, "sync/gather", None, 0, 10 * MS),
        span(0, "update/comm/gnn/edges", "update/comm/gnn", 10 * MS, 1 * MS),
        span(0, "update/comm/gnn", "update", 10 * MS, 4 * MS),
        span(0, "update", None, 10 * MS, 10 * MS),
        tick(0, 20 * MS, 1),
        # worker: 10 ms sampling, of which 2 ms acting-time messages
        span(1, "sample/comm/messages", "sample", 0, 2 * MS),
        span(1, "sample", None, 0, 10 * MS),
        span(1, "sync/wait", None, 10 * MS, 10 * MS),
        tick(1, 10 * MS, 1),
        span(0, "sync/gather", None, 20 * MS, 10 * MS),
        tick(0, 40 * MS, 2),
    ))
    s = m.snapshot()
    assert s.process_s == pytest.approx(0.050)
    assert s.shares == pytest.approx({"sample": 0.2, "update": 0.2, "sync": 0.6, "other": 0.0})
    # Nested communication is counted once: 4 ms (update) + 2 ms (sample) of 20 ms execution.
    assert s.comm_share == pytest.approx(6 / 20)
    assert s.comm_share_update == pytest.approx(4 / 10)
    assert s.iterations == 2 and s.wall_s == pytest.approx(0.040) and s.ips == pytest.approx(50.0)
    by_name = {p.name: p for p in s.phases}
    assert by_name["update/comm/gnn"].share == pytest.approx(4 / 50) and by_name["update/comm/gnn"].comm
    assert by_name["sync/gather"].count == 2


def test_feeding_in_pieces_gives_the_same_snapshot_as_at_once():
    recs = [span(0, "update", None, i * MS, (i % 7 + 1) * MS) for i in range(100)] + [tick(0, 200 * MS, 1)]
    whole = Metrics().add_all([rows(*recs)]).snapshot()
    parts = Metrics().add_all([rows(*recs[i:i + 13]) for i in range(0, len(recs), 13)]).snapshot()
    assert whole.phases == parts.phases and whole.ips == parts.ips


def test_percentiles_are_within_the_histogram_resolution():
    rng = np.random.default_rng(0)
    d = rng.lognormal(mean=13, sigma=1.0, size=20_000).astype(np.int64)
    hist = np.bincount(_bins(d), minlength=_N_BINS)
    for q, got in zip((0.5, 0.95, 0.99), quantiles_from_hist(hist, (0.5, 0.95, 0.99)), strict=True):
        exact = np.quantile(d, q)
        assert abs(got - exact) / exact < 0.025


def test_comm_is_a_path_segment_not_a_substring():
    assert is_comm("update/comm/gnn") and is_comm("sample/comm")
    assert not is_comm("update/community") and not is_comm("sample/act") and not is_comm(None)


def test_cores_mean_and_now():
    m = Metrics()
    m.add(rows(*[{"kind": "core", "t_ns": t, "core": c, "value": v}
                 for t, c, v in [(0, 0, 10.0), (0, 1, 50.0), (1, 0, 30.0), (1, 1, 70.0)]]))
    s = m.snapshot()
    assert s.cores_mean == [20.0, 60.0] and s.cores_now == [30.0, 70.0]


def gauge(proc, name, t, value):
    return {"kind": "counter", "proc": proc, "name": name, "t_ns": t, "value": value}


def test_warmup_progress_from_its_gauges():
    from marlwatch.report import progress_line, summary_text
    from marlwatch.wire import warmup_gauges

    done, needed = warmup_gauges("transitions")
    assert (done, needed) == ("warmup/transitions", "warmup/transitions/needed")
    m = Metrics()
    assert m.snapshot().warmup is None  # an algorithm without a warm-up reports none
    m.add(rows(gauge(0, done, 1 * MS, 200), gauge(0, needed, 1 * MS, 600), tick(0, 2 * MS, 1),
               gauge(0, done, 3 * MS, 400), gauge(0, needed, 3 * MS, 600), tick(0, 4 * MS, 2)))
    s = m.snapshot()
    assert s.warmup is not None and s.warmup.active
    assert (s.warmup.done, s.warmup.needed, s.warmup.unit, s.warmup.ended_s) == (400, 600, "transitions", None)
    assert s.to_json()["warmup"] == {"done": 400, "needed": 600, "unit": "transitions", "ended_s": None,
                                     "active": True}
    line = progress_line(s, None, 0)
    assert "warming up 400/600 transitions" in line and "comm" not in line
    assert "warming up 400/600 transitions when the recording ends" in summary_text(s)
    # The last report (done >= needed) ends it, at that report's time; later batches keep it over.
    m.add(rows(gauge(0, done, 5 * MS, 600), gauge(0, needed, 5 * MS, 600), tick(0, 6 * MS, 3)))
    m.add(rows(span(0, "update/comm/x", "update", 6 * MS, MS), span(0, "update", None, 6 * MS, 2 * MS),
               tick(0, 8 * MS, 4)))
    s = m.snapshot()
    assert not s.warmup.active and s.warmup.ended_s == pytest.approx(0.005)
    assert "comm 50.0% of exec" in progress_line(s, None, 0)
    assert "warm-up: 600 transitions before the first update, over at 0.0 s" in summary_text(s)
    # A snapshot is a copy: feeding more rows does not change one already handed out.
    held = m.snapshot()
    m.add(rows(gauge(0, done, 9 * MS, 1), gauge(0, needed, 9 * MS, 600)))
    assert held.warmup.done == 600 and m.snapshot().warmup.done == 1
