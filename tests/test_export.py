"""`marlwatch export` of the shipped recording: Perfetto/Chrome trace JSON, Parquet, CSV."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from marlwatch.cli import main
from marlwatch.recording import open_recording
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(60)
SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"


@pytest.fixture(scope="module")
def shipped_table():
    return open_recording(SHIPPED).read_all()


def check_trace(trace: dict, table) -> dict[int, str]:
    """Validate a trace-event JSON object against the recording it came from; returns pid -> name."""
    events = trace["traceEvents"]
    assert {e["ph"] for e in events} == {"M", "X", "C", "i"}
    for e in events:
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int) and isinstance(e["name"], str)
        if e["ph"] != "M":
            assert isinstance(e["ts"], int | float) and e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0
        if e["ph"] == "C":
            assert isinstance(e["args"]["value"], int | float)
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    # One track per process (learner, each worker) plus the machine's counters.
    assert sorted(names.values()) == ["learner", "machine", "worker 1", "worker 2"]
    by_name = {v: k for k, v in names.items()}
    # Every span is one complete event, on its process's track.
    spans = table.filter(pc.equal(table["kind"], "span"))
    xs = [e for e in events if e["ph"] == "X" and e["tid"] == 1]
    assert len(xs) == spans.num_rows
    per_pid = Counter(e["pid"] for e in xs)
    for slot, n in Counter(spans["proc"].to_pylist()).items():
        role = "learner" if slot == 0 else f"worker {slot}"
        assert per_pid[by_name[role]] == n
    assert {e["name"] for e in xs} == set(spans["name"].to_pylist())
    # Timestamps are monotonic per track: per (pid, tid) for slices, per (pid, name) for counters.
    last: dict[tuple, float] = defaultdict(lambda: -1.0)
    for e in events:
        if e["ph"] in ("X", "C"):
            key = (e["pid"], e["tid"]) if e["ph"] == "X" else (e["pid"], e["name"])
            assert e["ts"] >= last[key], (key, e)
            last[key] = e["ts"]
    # Slices of one track nest properly (a child lies inside its parent), as Perfetto requires.
    for pid in set(per_pid):
        stack: list[tuple[float, float]] = []
        for e in (x for x in xs if x["pid"] == pid):
            start, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][1] <= start + 1e-3:
                stack.pop()
            if stack:
                assert end <= stack[-1][1] + 1e-3, (e, stack[-1])
            stack.append((start, end))
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"cpu0 %", "cpu1 %", "IPS", "cpu %", "rss MB"} <= counters
    ips = [e["args"]["value"] for e in events if e["ph"] == "C" and e["name"] == "IPS"]
    assert max(ips) > 0
    return names


def test_perfetto_export_is_valid_trace_json(tmp_path, capsys, shipped_table):
    out = tmp_path / "trace.json"
    assert main(["export", str(SHIPPED), "--to", "perfetto", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    trace = json.loads(out.read_text())
    check_trace(trace, shipped_table)
    assert trace["displayTimeUnit"] == "ms"
    assert trace["otherData"]["marlwatch.run"]["algo"] == "maddpg"


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_tables_export(tmp_path, fmt, shipped_table):
    out = tmp_path / "tables"
    assert main(["export", str(SHIPPED), "--to", fmt, "-o", str(out)]) == 0
    read = pq.read_table if fmt == "parquet" else pcsv.read_csv
    spans = read(out / f"spans.{fmt}")
    counters = read(out / f"counters.{fmt}")
    src = shipped_table
    n_spans = pc.sum(pc.equal(src["kind"], "span")).as_py()
    n_counters = pc.sum(pc.is_in(src["kind"], value_set=pa.array(["core", "proc", "counter"]))).as_py()
    assert spans.num_rows == n_spans and counters.num_rows == n_counters
    assert spans.column_names == ["proc", "name", "parent", "t_ns", "dur_ns", "iter"]
    assert pc.sum(spans["dur_ns"]).as_py() == pc.sum(src.filter(pc.equal(src["kind"], "span"))["dur_ns"]).as_py()
    assert set(counters["kind"].to_pylist()) == {"core", "proc", "counter"}
    assert not (out / f"stacks.{fmt}").exists()  # no py-spy samples in this recording


def test_export_to_an_unwritable_path(tmp_path, capsys):
    for fmt, target in (("perfetto", "/proc/nope/trace.json"), ("parquet", "/proc/nope/dir"),
                        ("perfetto", str(tmp_path))):
        assert main(["export", str(SHIPPED), "--to", fmt, "-o", target]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"marlwatch: cannot write {target}"), err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", str(SHIPPED), "--to", "csv", "-o", str(blocker)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none.arrow"), "--to", "csv", "-o", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["export", str(SHIPPED), "--to", "svg", "-o", str(tmp_path / "x")]) == 2
    assert "invalid choice" in capsys.readouterr().err
