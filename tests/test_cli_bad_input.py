"""Bad input: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import os
import shutil

import pytest

from marlwatch.cli import main
from tests.conftest import REPO


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marlwatch: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "--headless", "--algo", "nope"], "unknown algorithm 'nope'"),
        (["run", "--headless", "--env", "nope"], "unknown env 'nope'"),
        (["run", "--headless", "--agents", "0"], "--agents must be at least 1"),
        (["run", "--headless", "--workers", "0"], "--workers must be at least 1"),
        (["run", "--headless", "--workers", "-3"], "--workers must be at least 1"),
        (["run", "--headless", "--agents", "two"], "--agents must be a whole number"),
        (["run", "--headless", "--set", "nonsense"], "--set takes KEY=VALUE"),
        (["run", "--headless", "--set", "no_such=1"], "unknown setting 'no_such'"),
        (["run", "--headless", "--set", "batch_size=big"], "batch_size must be a whole number >= 1"),
        (["run", "--headless", "--record", "/proc/nope/x.arrow"], "cannot write recording /proc/nope/x.arrow"),
        (["run", "--bogus-flag"], "unrecognized arguments"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_run_rejects_bad_input(capsys, argv, expected):
    assert expected in one_line_error(capsys, argv)


def test_summary_of_missing_empty_foreign_and_truncated_files(capsys, tmp_path, recorded):
    assert "no such file" in one_line_error(capsys, ["summary", str(tmp_path / "missing.arrow")])
    empty = tmp_path / "empty.arrow"
    empty.write_bytes(b"")
    assert "empty file" in one_line_error(capsys, ["summary", str(empty)])
    foreign = tmp_path / "notes.arrow"
    foreign.write_text("hello, not arrow\n" * 10)
    assert "not an Arrow IPC stream" in one_line_error(capsys, ["summary", str(foreign)])
    assert "is a directory" in one_line_error(capsys, ["summary", str(tmp_path)])
    # An Arrow stream that is not ours.
    import pyarrow as pa

    other = tmp_path / "other.arrow"
    with pa.ipc.new_stream(str(other), pa.schema([("x", pa.int64())])) as w:
        w.write_batch(pa.record_batch({"x": [1, 2]}))
    assert "not a marlwatch recording" in one_line_error(capsys, ["summary", str(other)])
    # Cut in the middle of the schema message: not readable at all, but an Arrow stream all the
    # same, so it is called truncated (with how much of the schema is there), not foreign.
    data = recorded.read_bytes()
    for cut in (5, 100, 500):
        head = tmp_path / f"head{cut}.arrow"
        head.write_bytes(data[:cut])
        line = one_line_error(capsys, ["summary", str(head)])
        assert "truncated" in line and f"({cut} of " in line and "not an Arrow" not in line, line


def _summary_json(capsys, path) -> tuple[dict, str]:
    import json

    assert main(["summary", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


@pytest.mark.parametrize("which", ["today", "shipped"])
def test_summary_of_a_file_cut_mid_batch_reads_what_is_complete(capsys, tmp_path, recorded, which):
    """Cut into the last batch, the file reads as far as its last complete batch. Today's writer
    (the session's short run) may have put every iteration in that last batch, as its flush cadence
    decides; the shipped recording has many batches, so its cut one has iterations to show."""
    from marlwatch import ipcscan

    source = recorded if which == "today" else REPO / "recordings" / "maddpg-3agents-2workers.arrow"
    with ipcscan.Stream(source) as stream:
        last = [m for m in stream.listing().messages if m.type == ipcscan.RECORD_BATCH][-1]
    data = source.read_bytes()
    cut, edge = tmp_path / "cut.arrow", tmp_path / "edge.arrow"
    cut.write_bytes(data[:(last.start + last.end) // 2])
    edge.write_bytes(data[:last.start])  # the same complete batches, cut between two of them

    s, err = _summary_json(capsys, cut)
    assert "truncated" in err and "lost" in err
    assert s["status"] == "truncated mid-batch"
    e, _ = _summary_json(capsys, edge)
    assert e["status"] == "truncated" and (s["iterations"], s["phases"]) == (e["iterations"], e["phases"])
    if which == "shipped":
        assert s["iterations"] > 0


@pytest.fixture
def recorded(maddpg_run):
    """A complete recording of today's code: the session's real MADDPG run (tests/conftest.py)."""
    return maddpg_run[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read any file and enter any directory")
def test_summary_of_a_file_the_user_may_not_read_or_reach(capsys, tmp_path, recorded):
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(recorded, locked / "run.arrow")
    unreadable = tmp_path / "unreadable.arrow"
    shutil.copy(recorded, unreadable)
    unreadable.chmod(0)
    locked.chmod(0)
    try:
        assert "Permission denied" in one_line_error(capsys, ["summary", str(locked / "run.arrow")])
        assert "Permission denied" in one_line_error(capsys, ["summary", str(unreadable)])
    finally:
        locked.chmod(0o700)
