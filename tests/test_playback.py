"""Playback over the shipped recording: the playhead, speeds, seeking, truncated files."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from marlwatch.metrics import Metrics, summarize
from marlwatch.playback import SPEEDS, Playback, speed_label
from marlwatch.recording import open_recording

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"


@pytest.fixture(scope="module")
def batches():
    rec = open_recording(SHIPPED)
    return rec.info, list(rec.batches())


def make(batches) -> Playback:
    info, bs = batches
    return Playback(info, bs)


def test_end_matches_summary(batches):
    pb = make(batches)
    pb.to_end()
    assert pb.at_end and pb.position_ns == pb.end_ns
    assert pb.snapshot().to_json() == summarize(open_recording(SHIPPED)).to_json()


def test_starts_at_first_row_with_nothing_fed(batches):
    pb = make(batches)
    s = pb.snapshot()
    assert pb.position_s == 0 and not pb.playing
    assert s.iterations == 0 and s.phases == [] and pb.duration_s > 10


def test_seek_back_rebuilds_to_the_same_figures(batches):
    pb = make(batches)
    pb.seek_s(18.0)
    at18 = pb.snapshot().to_json()
    assert 0 < pb.snapshot().iterations < 150
    pb.to_end()
    pb.seek_s(18.0)  # back: rebuilt from the start
    assert pb.snapshot().to_json() == at18
    fresh = make(batches)
    fresh.step(9.0)
    fresh.step(9.0)  # forward in two steps: fed incrementally
    assert fresh.snapshot().to_json() == at18


def test_seek_clamps(batches):
    pb = make(batches)
    pb.seek_s(-5)
    assert pb.position_ns == pb.start_ns
    pb.seek_s(1e9)
    assert pb.position_ns == pb.end_ns and pb.at_end


def test_advance_moves_by_wall_time_times_speed(batches):
    pb = make(batches)
    pb.seek_s(12.0)
    assert not pb.advance(1.0)  # paused: does not move
    pb.play()
    assert pb.advance(0.5)
    assert pb.position_s == pytest.approx(12.5, abs=1e-6)
    pb.set_speed(16.0)
    pb.advance(0.25)
    assert pb.position_s == pytest.approx(16.5, abs=1e-6)
    pb.pause()
    pb.advance(1.0)
    assert pb.position_s == pytest.approx(16.5, abs=1e-6)


def test_max_speed_feeds_bounded_chunks_and_stops_at_end(batches):
    pb = make(batches)
    pb.set_speed(math.inf)
    pb.play()
    steps = 0
    largest_batch = max(b.num_rows for b in batches[1])
    while pb.playing:
        fed = pb._fed
        pb.advance(0.25)
        # About a batch of the file per step: bounded work for the UI thread.
        assert 0 < pb._fed - fed <= 2 * largest_batch
        steps += 1
        assert steps <= len(batches[1])
    assert pb.at_end and pb.snapshot().complete
    assert pb.snapshot().iterations == 150
    pb.play()  # play at the end starts over
    assert pb.position_ns == pb.start_ns and pb.playing


def test_speed_cycle(batches):
    pb = make(batches)
    assert [speed_label(s) for s in SPEEDS] == ["1x", "4x", "16x", "max"]
    for expected in (4.0, 16.0, math.inf, math.inf):
        pb.faster()
        assert pb.speed == expected
    pb.slower()
    assert pb.speed == 16.0
    with pytest.raises(ValueError):
        pb.set_speed(3.0)


def test_truncated_recording_replays_to_its_last_batch(tmp_path, batches):
    cut = tmp_path / "cut.arrow"
    shutil.copy(SHIPPED, cut)
    size = cut.stat().st_size
    with open(cut, "r+b") as f:
        f.truncate(int(size * 0.6))
    rec = open_recording(cut)
    pb = Playback.from_recording(rec)
    assert rec.complete is False and rec.batches_read > 0
    pb.to_end()
    s = pb.snapshot()
    assert not s.complete and 0 < s.iterations < 150
    assert s.to_json() == Metrics(rec.info).add_all(open_recording(cut).batches()).snapshot().to_json()


def test_playing_holds_a_few_batches_not_the_recording():
    # Read from the file as it plays (not from a list in memory): the playhead keeps only the
    # batches that straddle it, so an hour-long recording replays in bounded memory.
    rec = open_recording(SHIPPED)
    pb = Playback.from_recording(rec)
    assert len(pb._index) > 20
    most = 0
    while not pb.at_end:
        pb.step(0.5)
        most = max(most, len(pb._open))
    assert most <= 3
    assert pb.snapshot().to_json() == summarize(open_recording(SHIPPED)).to_json()
