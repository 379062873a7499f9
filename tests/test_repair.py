"""`marlwatch repair`: a file cut mid-batch becomes a well-formed stream of its complete batches."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from marlwatch.cli import main
from marlwatch.recording import AGGREGATE_KINDS, FORMAT_KEY, METADATA_KEY, open_recording
from tests.conftest import REPO

SMALL = REPO / "recordings" / "maddpg-3agents-2workers.arrow"


@pytest.mark.parametrize("fraction", [0.3, 0.77])
def test_repair_keeps_every_complete_batch_and_warns_that_the_tail_is_lost(capsys, tmp_path, fraction):
    data = SMALL.read_bytes()
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(data[: int(len(data) * fraction)])
    before = open_recording(cut)
    kept = list(before.batches())
    assert before.truncated_mid_batch and kept

    assert main(["repair", str(cut)]) == 0
    out, err = capsys.readouterr()
    fixed = tmp_path / "cut.repaired.arrow"
    assert out.startswith(f"{fixed}: {len(kept)} complete batches")
    assert err.startswith("marlwatch: warning:") and "lost" in err and err.count("\n") == 1

    # pyarrow alone reads the whole repaired stream (read_all raises on the cut one).
    with pytest.raises((pa.ArrowInvalid, OSError)):
        pa.ipc.open_stream(cut.read_bytes()).read_all()
    table = pa.ipc.open_stream(fixed.read_bytes()).read_all()
    note = table.slice(table.num_rows - 1).to_pylist()[0]
    assert note["kind"] == "event" and note["name"] == "repaired"
    assert json.loads(note["text"])["tail_lost"] is True
    # Every row kept, plus the note; written in the current format, so with aggregates of the spans.
    rows = table.filter(pc.invert(pc.is_in(table.column("kind").cast(pa.string()), pa.array(AGGREGATE_KINDS))))
    assert rows.num_rows == sum(b.num_rows for b in kept) + 1 < table.num_rows
    assert table.schema.metadata[METADATA_KEY] == before.schema.metadata[METADATA_KEY]  # run info kept as it was
    assert table.schema.metadata[FORMAT_KEY] == b"2"

    after = open_recording(fixed)
    list(after.batches())
    assert not after.truncated_mid_batch and not after.complete  # the run's end is still missing
    assert main(["summary", str(fixed), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "truncated"


def test_repair_of_a_complete_file_copies_it(capsys, tmp_path):
    out_path = tmp_path / "copy.arrow"
    assert main(["repair", str(SMALL), "-o", str(out_path)]) == 0
    assert "nothing was lost" in capsys.readouterr().err
    rec = open_recording(out_path)
    assert sum(b.num_rows for b in rec.batches()) == pa.ipc.open_stream(SMALL.read_bytes()).read_all().num_rows
    assert rec.complete


def test_repair_of_bad_input_gives_one_line(capsys, tmp_path):
    foreign = tmp_path / "foreign.arrow"
    foreign.write_text("not arrow")
    for argv, expected in [
        (["repair", str(tmp_path / "missing.arrow")], "no such file"),
        (["repair", str(foreign)], "not an Arrow IPC stream"),
        (["repair", str(SMALL), "-o", str(tmp_path)], "is a directory"),
        (["repair", str(SMALL), "-o", "/proc/no-such-dir/x.arrow"], "cannot write"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("marlwatch: ") and expected in err, err
    assert not list(tmp_path.glob(".repair-*"))  # no temporary file left behind
