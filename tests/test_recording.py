"""Recordings: round trip, end marker, truncation, foreign readers."""

from __future__ import annotations

import pyarrow as pa
import pytest

from marlwatch.collector import core_rows, event_row
from marlwatch.recording import RecordingError, RecordingWriter, RunInfo, open_recording

INFO = RunInfo(algo="maddpg", env="simple_spread", agents=3, workers=2, seed=1, iterations=10, host="h", cores=2)


def write(path, n_batches: int, *, close: bool = True) -> RecordingWriter:
    w = RecordingWriter(path, INFO)
    for i in range(n_batches):
        w.append(core_rows(i * 100_000_000, [10.0 + i, 20.0]))
        w.flush()
    if close:
        w.close(t_ns=n_batches * 100_000_000)
    return w


def test_round_trip_keeps_rows_metadata_and_the_end_marker(tmp_path):
    path = tmp_path / "r.arrow"
    write(path, 3)
    rec = open_recording(path)
    assert rec.info == INFO
    table = rec.read_all()
    assert rec.complete and rec.status == "complete"
    assert table.num_rows == 3 * 2 + 1
    assert table["kind"].to_pylist()[-1] == "end"


def test_a_stream_cut_between_batches_is_reported_truncated(tmp_path):
    path = tmp_path / "r.arrow"
    w = write(path, 3, close=False)
    w._file.flush()  # simulate SIGKILL: the writer never closes
    rec = open_recording(path)
    assert rec.read_all().num_rows == 6
    assert rec.complete is False and rec.status == "truncated"


def test_a_file_cut_mid_batch_yields_every_complete_batch(tmp_path):
    path = tmp_path / "r.arrow"
    write(path, 4)
    data = path.read_bytes()
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(data[:-150])  # inside the last batch or the end marker
    rec = open_recording(cut)
    batches = list(rec.batches())
    assert rec.truncated_mid_batch and rec.status == "truncated mid-batch"
    assert sum(b.num_rows for b in batches) >= 6
    with pytest.raises((pa.ArrowInvalid, OSError)):
        pa.ipc.open_stream(str(cut)).read_all()  # why marlwatch reads batch by batch


def test_writer_refuses_an_unwritable_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RecordingError, match="cannot write recording"):
        RecordingWriter(blocker / "sub" / "r.arrow", INFO)


def test_events_keep_their_detail(tmp_path):
    path = tmp_path / "r.arrow"
    with RecordingWriter(path, INFO) as w:
        w.append(event_row(5, 1, "crashed", error="boom"))
    table = open_recording(path).read_all()
    assert table["text"][0].as_py() == '{"error": "boom"}'
