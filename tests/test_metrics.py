"""The metric definitions (docs/metrics.md), on hand-made rows with known answers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from marlwatch.metrics import _N_BINS, Metrics, _bins, _groups, _value_counts, is_comm, quantiles_from_hist
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
    T = 110 * MS  # the first iteration (start-up) ends at 110 ms; its spans are left out below
    m = Metrics()
    m.add(rows(
        # start-up: the learner waits 100 ms for the workers to start, then stores their rollouts
        span(0, "sync/gather", None, 0, 100 * MS, it=0),
        span(0, "update", None, 100 * MS, 10 * MS, it=0),
        tick(0, T, 1),
        span(1, "sample", None, 50 * MS, 50 * MS, it=0),
        tick(1, 100 * MS, 1),
        # learner: 10 ms update (4 ms of it communication, 1 ms nested deeper), 10 ms waiting
        span(0, "sync/gather", None, T, 10 * MS, it=1),
        span(0, "update/comm/gnn/edges", "update/comm/gnn", T + 10 * MS, 1 * MS, it=1),
        span(0, "update/comm/gnn", "update", T + 10 * MS, 4 * MS, it=1),
        span(0, "update", None, T + 10 * MS, 10 * MS, it=1),
        tick(0, T + 20 * MS, 2),
        # worker: 10 ms sampling, of which 2 ms acting-time messages
        span(1, "sample/comm/messages", "sample", T, 2 * MS, it=1),
        span(1, "sample", None, T, 10 * MS, it=1),
        span(1, "sync/wait", None, T + 10 * MS, 10 * MS, it=1),
        tick(1, T + 10 * MS, 2),
        span(0, "sync/gather", None, T + 20 * MS, 10 * MS, it=2),
        tick(0, T + 40 * MS, 3),
    ))
    s = m.snapshot()
    assert s.process_s == pytest.approx(0.050)
    assert s.shares == pytest.approx({"sample": 0.2, "update": 0.2, "sync": 0.6, "other": 0.0})
    # Nested communication is counted once: 4 ms (update) + 2 ms (sample) of 20 ms execution.
    assert s.comm_share == pytest.approx(6 / 20)
    assert s.comm_share_update == pytest.approx(4 / 10)
    # Start-up is the first iteration, from the run's start; IPS and latencies are the rest.
    assert s.iterations == 3 and s.startup_s == pytest.approx(0.110) and s.wall_s == pytest.approx(0.150)
    assert s.steady_s == pytest.approx(0.040) and s.ips == pytest.approx(50.0)
    assert s.iteration_ms == pytest.approx({"p50": 20.0, "p95": 20.0, "p99": 20.0})
    by_name = {p.name: p for p in s.phases}
    assert by_name["update/comm/gnn"].share == pytest.approx(4 / 50) and by_name["update/comm/gnn"].comm
    assert by_name["sync/gather"].count == 2
    assert {p.role: p.ips for p in s.procs} == pytest.approx({"main": 50.0, "worker 1": 1 / 0.020})


def test_startup_is_apart_until_then_shown_and_kept_for_a_process_that_never_ticks():
    m = Metrics()
    m.add(rows(span(0, "sync/gather", None, 0, 50 * MS, it=0), span(2, "other/helper", None, 0, 5 * MS, it=0)))
    s = m.snapshot()
    # Before the first iteration ends there is only start-up to show, so it is shown.
    assert s.startup_s is None and s.ips == 0.0 and s.ips_now == 0.0 and s.iterations == 0
    assert {p.name for p in s.phases} == {"sync/gather", "other/helper"}
    from marlwatch.report import progress_line

    assert progress_line(s, 10, 0) == "it 0/10  starting up 0 s  rec 0 B"  # no rate or share of zero
    m.add(rows(tick(0, 60 * MS, 1), span(0, "update", None, 60 * MS, 10 * MS, it=1), tick(0, 80 * MS, 2)))
    s = m.snapshot()
    # Once it ends, the learner's first iteration is start-up; the helper never ticks, so its
    # spans are all it has and they count.
    assert s.startup_s == pytest.approx(0.060) and s.ips == pytest.approx(50.0)
    assert {p.name: p.total_s for p in s.phases} == pytest.approx({"update": 0.010, "other/helper": 0.005})
    assert s.to_json()["startup_s"] == pytest.approx(0.060)


def test_feeding_in_pieces_gives_the_same_snapshot_as_at_once():
    recs = [tick(0, 0, 1)] + [span(0, "update", None, i * MS, (i % 7 + 1) * MS, it=1) for i in range(100)] \
        + [tick(0, 200 * MS, 2)]
    whole = Metrics().add_all([rows(*recs)]).snapshot()
    parts = Metrics().add_all([rows(*recs[i:i + 13]) for i in range(0, len(recs), 13)]).snapshot()
    assert whole.phases == parts.phases and whole.ips == parts.ips


def test_phases_inside_an_open_top_level_span_wait_for_it():
    """A span is sent when it ends, so the phases inside an `update` still running arrive first.
    They count once `update` closes (or its process ends an iteration), never before: no share
    above 100 %, no nested row larger than its parent's (docs/metrics.md)."""
    T = 100 * MS
    m = Metrics()
    m.add(rows(tick(0, T, 1), span(0, "sample", None, T, 10 * MS, it=1)))
    # 30 ms into an update that is still running: 25 ms of communication has ended inside it.
    m.add(rows(span(0, "update/comm/graph", "update", T + 10 * MS, 25 * MS, it=1),
               span(0, "update/backward", "update", T + 35 * MS, 5 * MS, it=1)))
    s = m.snapshot()
    assert s.comm_share == 0.0 and s.exec_s == pytest.approx(0.010)
    assert {p.name for p in s.phases} == {"sample"}
    m.add(rows(span(0, "update", None, T + 10 * MS, 40 * MS, it=1)))  # it closes
    s = m.snapshot()
    assert s.comm_share == pytest.approx(25 / 50) and s.comm_share_update == pytest.approx(25 / 40)
    assert {p.name: p.total_s for p in s.phases} == pytest.approx(
        {"sample": 0.010, "update": 0.040, "update/comm/graph": 0.025, "update/backward": 0.005})

    # A process whose outer span never closes (a user's span around the whole loop): its
    # iterations release what ended before them.
    m.add(rows(span(1, "train/step", "train", T, 5 * MS, it=1)))
    assert "train/step" not in {p.name for p in m.snapshot().phases}
    m.add(rows(tick(1, T + 6 * MS, 2)))
    assert {p.name: p.count for p in m.snapshot().phases}["train/step"] == 1

    # Reading a recording to its end counts everything, closed or not (a run cut mid-update).
    cut = Metrics().add_all([rows(tick(0, T, 1), span(0, "update/comm/graph", "update", T, 25 * MS, it=1))])
    assert cut.snapshot().comm_s == pytest.approx(0.025)


def test_replay_never_shows_a_share_above_100_percent():
    """A real recording of 15-second iterations with communication inside them, played at
    every 2 s: the shares and the comm shares stay within 100 %, and the end is what summary says."""
    from marlwatch.metrics import summarize
    from marlwatch.playback import Playback
    from marlwatch.recording import open_recording
    from tests.conftest import REPO

    path = REPO / "recordings" / "tom2c-per-agent-8agents-flame.arrow"
    pb = Playback.from_recording(open_recording(path))
    for t in np.arange(2.0, pb.duration_s + 2.0, 2.0):
        pb.seek_s(min(t, pb.duration_s))
        s = pb.snapshot()
        assert s.comm_share <= 1 and s.comm_share_update <= 1, (t, s.comm_s, s.exec_s, s.update_s)
        assert all(v <= 1 + 1e-9 for v in s.shares.values()), (t, s.shares)
    end = summarize(open_recording(path))
    assert s.comm_s == pytest.approx(end.comm_s) and s.exec_s == pytest.approx(end.exec_s)


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
    m.add(rows(span(0, "update/comm/x", "update", 6 * MS, MS, it=3), span(0, "update", None, 6 * MS, 2 * MS, it=3),
               tick(0, 8 * MS, 4)))
    s = m.snapshot()
    assert not s.warmup.active and s.warmup.ended_s == pytest.approx(0.005)
    assert "comm 50.0% of exec" in progress_line(s, None, 0)
    assert "warm-up: 600 transitions before the first update, over at 0.0 s" in summary_text(s)
    # A snapshot is a copy: feeding more rows does not change one already handed out.
    held = m.snapshot()
    m.add(rows(gauge(0, done, 9 * MS, 1), gauge(0, needed, 9 * MS, 600)))
    assert held.warmup.done == 600 and m.snapshot().warmup.done == 1


@pytest.mark.parametrize("name", ["maddpg-3agents-2workers.arrow", "sweep-tom2c/tom2c-a8-w2.arrow",
                                  "sweep-neurcomm/neurcomm-a8-w1.arrow"])
def test_summary_fits_80_columns(name):
    from marlwatch.metrics import summarize
    from marlwatch.recording import open_recording
    from marlwatch.report import summary_text
    from tests.conftest import REPO

    text = summary_text(summarize(open_recording(REPO / "recordings" / name)), "run.arrow", "complete")
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "start-up" in text and "after the first" in text


def test_ips_history_is_complete_seconds_up_to_now_with_a_stall_as_zeros():
    S = 1000 * MS
    m = Metrics()
    # 3 iterations in second 0, 5 in second 1, 2 so far in second 2 (in progress).
    times = [t * S // 10 for t in (1, 4, 7)] + [S + t * S // 10 for t in range(5)] + [2 * S + MS, 2 * S + 2 * MS]
    m.add(rows(*(tick(0, t, i + 1) for i, t in enumerate(times))))
    # The second in progress is not a rate yet: the plot would show it as a slow second.
    assert m.snapshot().ips_history == [3.0, 5.0]
    # No tick for three seconds (a stall), time goes on (a core sample at 5.5 s): zeros, not a frozen plot.
    m.add(rows({"kind": "core", "core": 0, "t_ns": 5 * S + S // 2, "value": 50.0}))
    assert m.snapshot().ips_history == [3.0, 5.0, 2.0, 0.0, 0.0]
    # Of a finished run, the last second with iterations is all there will be of it.
    m.add(rows(tick(0, 5 * S + S // 2 + MS, 11), {"kind": "end", "t_ns": 5 * S + S // 2 + 2 * MS, "text": "{}"}))
    assert m.snapshot().ips_history == [3.0, 5.0, 2.0, 0.0, 0.0, 1.0]


def counter(name, t, value, proc=0):
    return {"kind": "counter", "proc": proc, "name": name, "t_ns": t, "value": value}


def test_counters_are_read_by_name_with_the_row_semantics(monkeypatch):
    """Counters are folded a name at a time (a run has a few names and a row per episode), with
    what a row-by-row reading gives: `episodes` summed, other names' last value, every
    `episode_return` in order, the warm-up ended at the first row where done reached needed (its
    two gauges interleave), and past the bound, the names that came last are the ones left out."""
    import marlwatch.metrics as metrics

    monkeypatch.setattr(metrics, "MAX_COUNTERS", 5)
    m = Metrics()
    m.add(rows(
        counter("warmup/transitions/needed", 1 * MS, 300.0),
        counter("episodes", 2 * MS, 1.0), counter("episode_return", 2 * MS, -3.0),
        counter("warmup/transitions", 3 * MS, 100.0),
        counter("loss/critic", 4 * MS, 0.9),
        counter("episodes", 5 * MS, 1.0), counter("episode_return", 5 * MS, -1.0),
        counter("warmup/transitions", 6 * MS, 300.0),  # the warm-up ends here, at 6 ms
        counter("loss/critic", 7 * MS, 0.5),
        counter("warmup/transitions", 8 * MS, 400.0),
    ))
    m.add(rows(
        counter("episode_return", 9 * MS, 2.0), counter("episodes", 9 * MS, 1.0),
        counter("loss/actor", 10 * MS, 7.0),  # the 6th name: past the bound
        counter("loss/critic", 11 * MS, 0.25),
        counter("loss/actor", 12 * MS, 6.0),
    ))
    s = m.snapshot()
    assert m.counters == {"warmup/transitions/needed": 300.0, "episodes": 3.0, "episode_return": 2.0,
                          "warmup/transitions": 400.0, "loss/critic": 0.25}
    assert s.returns == [-3.0, -1.0, 2.0]
    assert s.warmup is not None and not s.warmup.active
    assert (s.warmup.done, s.warmup.needed, s.warmup.unit, s.warmup.ended_s) == (400.0, 300.0, "transitions", 0.006)
    assert m.skipped.rows[metrics.PAST_COUNTERS] == 2


def test_process_samples_keep_each_process_latest():
    """CPU and memory samples are folded a process at a time: each one's latest value of each,
    a process that only reported memory has no CPU figure, and processes appear in the order
    their first sample came."""
    def sample(proc, name, t, value):
        return {"kind": "proc", "proc": proc, "name": name, "t_ns": t, "value": value}

    m = Metrics()
    m.add(rows(sample(2, "cpu_percent", 1 * MS, 10.0), sample(0, "rss_bytes", 1 * MS, 100.0),
               sample(2, "rss_bytes", 2 * MS, 200.0), sample(2, "cpu_percent", 3 * MS, 30.0),
               sample(0, "rss_bytes", 4 * MS, 150.0)))
    m.add(rows(sample(2, "cpu_percent", 5 * MS, 50.0)))
    assert list(m.procs) == [2, 0]
    assert (m.procs[2].cpu, m.procs[2].rss) == (50.0, 200.0)
    assert (m.procs[0].cpu, m.procs[0].rss) == (None, 150.0)


@pytest.mark.parametrize("span", [5, 70_000, 1 << 40])
def test_groups_and_value_counts_match_a_loop_over_the_rows(span):
    """Both paths of each (counted or radix-sorted where the keys' range is small, sorted by
    np.unique where it is not) give what a loop over the rows gives."""
    rng = np.random.default_rng(span)
    keys = rng.integers(-3, span, 5_000) * (1 if span < 1 << 20 else 977)
    seen: dict[int, list[int]] = {}
    for i, k in enumerate(keys.tolist()):
        seen.setdefault(k, []).append(i)
    groups = [(k, rows.tolist()) for k, rows in _groups(keys)]
    assert groups == list(seen.items())  # keys in first-appearance order, rows in row order
    values, counts = _value_counts(keys)
    assert values.tolist() == sorted(seen) and counts.tolist() == [len(seen[k]) for k in sorted(seen)]


def test_a_name_the_dictionary_holds_twice_reads_as_one_name():
    """A crafted file's `name` dictionary may name a value twice: rows under either entry are
    one counter and one sample name, read in row order, as a row-by-row reading has them."""
    def twice(*records: dict, codes: list[int]) -> pa.RecordBatch:
        b = rows(*records)
        name = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array([b.column("name")[0].as_py()] * 2))
        return b.set_column(b.schema.get_field_index("name"), b.schema.field("name"), name)

    m = Metrics()
    m.add(twice(counter("episode_return", 1 * MS, 1.0), counter("episode_return", 2 * MS, 2.0),
                counter("episode_return", 3 * MS, 3.0), counter("episode_return", 4 * MS, 4.0), codes=[0, 1, 1, 0]))
    m.add(twice({"kind": "proc", "proc": 1, "name": "cpu_percent", "t_ns": 5 * MS, "value": 10.0},
                {"kind": "proc", "proc": 1, "name": "cpu_percent", "t_ns": 6 * MS, "value": 20.0}, codes=[0, 1]))
    assert m.counters == {"episode_return": 4.0}
    assert m.snapshot().returns == [1.0, 2.0, 3.0, 4.0]
    assert m.procs[1].cpu == 20.0
