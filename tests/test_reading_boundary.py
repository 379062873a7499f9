"""The reading boundary (marlwatch/validate.py): each row kind and the run metadata are checked
once, as a file is read; what is invalid is skipped, counted and warned about once; what a file
can make marlwatch allocate is bounded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest

from marlwatch.cli import main
from marlwatch.metrics import read_iterations, summarize
from marlwatch.recording import BATCH_SEQ_KEY, SCHEMA, RecordingWriter, RunInfo, open_recording
from marlwatch.validate import (
    BAD_JSON,
    MAX_COUNTERS,
    MAX_PHASES,
    MAX_PROCS,
    MISSING,
    NOT_FINITE,
    PAST_COUNTERS,
    PAST_PHASES,
    RANGE,
    TOO_LONG,
    UNKNOWN,
    load_json,
)
from tests.hostile import INFO, MS, end_row, run_file, run_rows, write


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("marlwatch: ") and "Traceback" not in err, err
    return err


def warning_of(capsys, argv: list[str]) -> tuple[str, str]:
    """Run a command that must succeed; its stdout and its one warning line."""
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    warnings = [ln for ln in err.splitlines() if ln.startswith("marlwatch: warning: ")]
    assert len(warnings) == 1, err
    return out, warnings[0]


def figures(path: Path) -> dict:
    snap = summarize(open_recording(path))
    return {"iterations": snap.iterations, "phases": {p.name: (p.count, p.total_s) for p in snap.phases},
            "cores": snap.cores_mean, "counters": snap.counters, "stacks": snap.stacks,
            "procs": [(p.role, p.state, p.iterations) for p in snap.procs]}


# -- rows ------------------------------------------------------------------------------------
BAD_ROWS = {
    "NaN core value": ({"kind": "core", "core": 0, "t_ns": 5, "value": math.nan}, NOT_FINITE),
    "infinite core value": ({"kind": "core", "core": 1, "t_ns": 5, "value": math.inf}, NOT_FINITE),
    "core out of range": ({"kind": "core", "core": 20000, "t_ns": 5, "value": 50.0}, RANGE),
    "infinite counter": ({"kind": "counter", "proc": 0, "name": "episode_return", "t_ns": 5,
                          "value": -math.inf}, NOT_FINITE),
    "NaN process cpu": ({"kind": "proc", "proc": 0, "name": "cpu_percent", "t_ns": 5, "value": math.nan},
                        NOT_FINITE),
    "NaN stack count": ({"kind": "stack", "proc": 0, "name": "update/critic", "t_ns": 5, "value": math.nan,
                         "text": "a;b"}, NOT_FINITE),
    "zero-count stack row": ({"kind": "stack", "proc": 0, "name": "update/critic", "t_ns": 5, "value": 0.0,
                              "text": "a;b"}, RANGE),
    "stack without a stack": ({"kind": "stack", "proc": 0, "name": "update/critic", "t_ns": 5, "value": 3.0},
                              MISSING),
    "span without a name": ({"kind": "span", "proc": 0, "t_ns": 5, "dur_ns": 5, "iter": 0}, MISSING),
    "span with an empty name": ({"kind": "span", "proc": 0, "name": "", "t_ns": 5, "dur_ns": 5}, MISSING),
    "span without a duration": ({"kind": "span", "proc": 0, "name": "update", "t_ns": 5}, MISSING),
    "negative duration": ({"kind": "span", "proc": 0, "name": "update", "t_ns": 5, "dur_ns": -1}, RANGE),
    "process slot out of range": ({"kind": "span", "proc": MAX_PROCS, "name": "update", "t_ns": 5, "dur_ns": 1},
                                  RANGE),
    "negative iteration": ({"kind": "iter", "proc": 1, "t_ns": 5, "iter": -4}, RANGE),
    "iteration without a process": ({"kind": "iter", "t_ns": 5, "iter": 100}, MISSING),
    "time out of range": ({"kind": "span", "proc": 0, "name": "update", "t_ns": -2**63, "dur_ns": 1}, RANGE),
    "a name of 2 KB": ({"kind": "span", "proc": 0, "name": "update/" + "x" * 2048, "t_ns": 5, "dur_ns": 1},
                       TOO_LONG),
    "event detail not JSON": ({"kind": "event", "proc": 1, "name": "crashed", "t_ns": 5, "text": "{oops"},
                              BAD_JSON),
    "event detail a list": ({"kind": "event", "proc": 1, "name": "crashed", "t_ns": 5, "text": "[1, 2]"},
                            BAD_JSON),
    "event detail nested 100,000 deep": ({"kind": "event", "proc": 1, "name": "crashed", "t_ns": 5,
                                          "text": '{"a":' + "[" * 100_000 + "]" * 100_000 + "}"}, BAD_JSON),
    "an unknown kind": ({"kind": "spam", "proc": 0, "name": "update", "t_ns": 5, "dur_ns": 1}, UNKNOWN),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_an_invalid_row_is_skipped_counted_and_warned_about_once(tmp_path, capsys, case):
    row, reason = BAD_ROWS[case]
    clean = run_file(tmp_path / "clean.arrow")
    rows = run_rows()
    path = write(tmp_path / "bad.arrow", [rows[:40] + [row] + rows[40:], [end_row()]])
    rec = open_recording(path)
    assert figures(path) == figures(clean)  # the valid rows give the same figures
    summarize(rec)
    assert dict(rec.skipped.rows) == {reason: 1}
    for argv in (["summary", str(path)], ["summary", str(path), "--json"], ["diff", str(clean), str(path)],
                 ["export", str(path), "--to", "perfetto", "-o", str(tmp_path / "t.json")],
                 ["flame", str(path), "--phase", "update"]):
        out, warning = warning_of(capsys, argv)
        assert f"skipped 1 row (1 {reason})" in warning, (argv, warning)


def test_nothing_valid_left_is_one_line_and_exit_2(tmp_path, capsys):
    path = write(tmp_path / "nan.arrow", [[{"kind": "core", "core": 0, "t_ns": t, "value": math.nan}
                                           for t in range(50)]])
    for argv in (["summary", str(path)], ["diff", str(path), str(path)], ["flame", str(path), "--phase", "x"],
                 ["export", str(path), "--to", "csv", "-o", str(tmp_path / "out")], ["repair", str(path)]):
        err = one_line_error(capsys, argv)
        assert "nothing valid to read: skipped 50 rows (50 NaN or infinite)" in err, err
    from marlwatch.cli import UsageError
    from marlwatch.cli.files import load_replay as load

    with pytest.raises(UsageError, match="nothing valid to read"):
        load(str(path))


def test_summary_json_is_json_even_where_figures_are_not_numbers(tmp_path, capsys):
    """No iteration: the latency percentiles are NaN, which json.dumps wrote as `NaN`."""
    path = write(tmp_path / "no-iter.arrow", [[r for r in run_rows() if r["kind"] != "iter"]])
    capsys.readouterr()
    assert main(["summary", str(path), "--json"]) == 0

    def strict(const: str) -> None:
        raise AssertionError(f"{const} is not JSON")

    out = json.loads(capsys.readouterr().out, parse_constant=strict)
    assert out["iteration_ms"] == {"p50": None, "p95": None, "p99": None}


# -- metadata ----------------------------------------------------------------------------------
def test_metadata_entries_of_the_wrong_type_are_dropped(tmp_path, capsys):
    info = {**INFO, "procs": {"0": "learner", "1": 7, "2": ["worker 2"], "x": "w", "999": "w"},
            "pinning": {"0": 0, "1": "one", "2": -3}, "host": 5, "start_unix": "yesterday",
            "extra": {"latency_bound_ms": -1, "config": [1, 2]}, "versions": {"python": 3.11}}
    path = write(tmp_path / "meta.arrow", [run_rows(), [end_row()]], info=info)
    rec = open_recording(path)
    assert rec.info.procs == {"0": "learner"} and rec.info.pinning == {"0": 0} and rec.info.host == ""
    assert rec.info.extra == {} and rec.info.versions == {}
    assert rec.skipped.metadata == 11
    out, warning = warning_of(capsys, ["summary", str(path)])
    assert "ignored 11 invalid run metadata entries" in warning
    assert "worker 1" in out  # the slot's process is still shown, under its default role


def test_non_numbers_in_metadata_become_null_and_every_output_stays_json(tmp_path, capsys):
    raw = json.dumps({**INFO, "extra": {"lr": 1.0, "config": {"gamma": 0.9}}}).replace("1.0", "NaN") \
        .replace("0.9", "1e999")
    path = write(tmp_path / "nan-meta.arrow", [run_rows(), [end_row()]], meta=raw)
    assert open_recording(path).info.extra == {"lr": None, "config": {"gamma": None}}
    capsys.readouterr()
    assert main(["export", str(path), "--to", "perfetto", "-o", str(tmp_path / "t.json")]) == 0
    json.loads((tmp_path / "t.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


@pytest.mark.parametrize("meta,why", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps({**INFO, "extra": {"x": json.loads("[" * 40 + "]" * 40)}}), "nested deeper than 32 levels"),
    (json.dumps({**INFO, "algo": ["maddpg"]}), "'algo' is missing or not a string"),
    (json.dumps({k: v for k, v in INFO.items() if k != "workers"}), "'workers' is missing"),
    ("\"just a string\"", "not a JSON object"),
])
def test_unusable_metadata_is_one_line(tmp_path, capsys, meta, why):
    path = write(tmp_path / "meta.arrow", [run_rows()], meta=meta)
    assert why in one_line_error(capsys, ["summary", str(path)])


def test_load_json_bounds():
    assert load_json('{"a": NaN, "b": [Infinity, -Infinity, 1e400, 2.5]}') == {"a": None, "b": [None, None, None, 2.5]}
    for bad in ("[" * 5000 + "]" * 5000, "{" * 3, "1" * 5000, '"x"' + " " * (1 << 20)):
        with pytest.raises(ValueError):
            load_json(bad)


# -- schemas -----------------------------------------------------------------------------------
def _with_column(tmp_path: Path, name: str) -> Path:
    schema = SCHEMA.append(pa.field("zzzzextra", pa.int64()))
    rows = [{**r, "zzzzextra": 1} for r in run_rows()]
    path = write(tmp_path / "x.arrow", [rows, [end_row()]], schema=schema)
    data = path.read_bytes()
    assert data.count(b"zzzzextra") == 1
    path.write_bytes(data.replace(b"zzzzextra", name.encode("latin-1")))
    return path


def test_extra_columns_are_read_past_even_with_a_name_that_is_not_utf8(tmp_path, capsys):
    clean = run_file(tmp_path / "clean.arrow")
    path = _with_column(tmp_path, "zzzz\xffxtra")
    assert figures(path) == figures(clean)
    capsys.readouterr()
    assert main(["repair", str(path), "-o", str(tmp_path / "fixed.arrow")]) == 0
    assert pa.ipc.open_stream(str(tmp_path / "fixed.arrow")).schema.names == SCHEMA.names


@pytest.mark.parametrize("damage", ["dur_ns", "kind"])
def test_a_damaged_or_doubled_column_of_ours_is_one_line(tmp_path, capsys, damage):
    """Our own column named with a byte that is not UTF-8 (UnicodeDecodeError in pyarrow), or
    a second column of the same name."""
    path = _with_column(tmp_path, "zzzzextra")
    data = path.read_bytes()
    if damage == "dur_ns":
        path.write_bytes(data.replace(b"dur_ns", b"dur\xffns"))
    else:
        schema = SCHEMA.append(pa.field("kind", pa.string()))
        path = write(tmp_path / "twice.arrow", [[{**r, "kind": r["kind"]} for r in run_rows()]], schema=schema)
    assert "unexpected columns" in one_line_error(capsys, ["summary", str(path)])


# -- batches: duplicated, reordered, missing ----------------------------------------------------
def _batches(n: int = 4) -> list[list[dict]]:
    return [run_rows(3, first=3 * k) for k in range(n)] + [[end_row()]]


def test_the_writer_numbers_its_batches(tmp_path):
    with RecordingWriter(tmp_path / "w.arrow", RunInfo(**{k: INFO[k] for k in ("algo", "env", "agents", "workers",
                                                                              "seed", "iterations")}),
                         flush_interval_s=0) as w:
        for rows in _batches(3)[:3]:
            w.append(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
    with open(tmp_path / "w.arrow", "rb") as f:
        reader = pa.ipc.open_stream(f)
        seqs = [int(m[BATCH_SEQ_KEY]) for b, m in reader.iter_batches_with_custom_metadata() if b.num_rows]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 4  # three batches and the end marker


@pytest.mark.parametrize("numbered", [True, False], ids=["numbered", "old file"])
@pytest.mark.parametrize("order", [[0, 1, 2, 2, 3, 4], [0, 1, 2, 3, 1, 4], [0, 2, 1, 3, 4]],
                         ids=["duplicated", "repeated later", "reordered"])
def test_repeated_or_reordered_batches_are_skipped_and_said(tmp_path, capsys, numbered, order):
    batches = _batches()
    clean = write(tmp_path / "clean.arrow", batches)
    path = write(tmp_path / "spliced.arrow", [batches[i] for i in order], seq=order if numbered else False)
    got = figures(path)
    if order == [0, 2, 1, 3, 4]:  # batch 1, read late, is left out: its rows are missing
        assert got["iterations"] == 12 and got["phases"]["sample"][0] == figures(clean)["phases"]["sample"][0] - 6
    else:
        assert got == figures(clean)  # not counted twice
    out, warning = warning_of(capsys, ["summary", str(path)])
    assert "skipped 1 batch repeating earlier ones (duplicated or out of order)" in warning, warning


def test_a_batch_missing_from_the_middle_is_said(tmp_path, capsys):
    batches = _batches()
    path = write(tmp_path / "gap.arrow", [batches[i] for i in (0, 1, 3, 4)], seq=[0, 1, 3, 4])
    out, warning = warning_of(capsys, ["summary", str(path)])
    assert "1 batch missing from the middle" in warning


def test_repair_leaves_out_what_is_invalid_and_renumbers(tmp_path, capsys):
    batches = _batches()
    batches[1].append({"kind": "core", "core": 0, "t_ns": 5, "value": math.nan})
    path = write(tmp_path / "bad.arrow", [batches[i] for i in (0, 1, 1, 2)], seq=[0, 1, 1, 2])
    out, warning = warning_of(capsys, ["repair", str(path), "-o", str(tmp_path / "fixed.arrow")])
    assert "skipped 1 row" in warning and "skipped 1 batch repeating" in warning
    fixed = open_recording(tmp_path / "fixed.arrow")
    summarize(fixed)
    assert not fixed.skipped
    with open(tmp_path / "fixed.arrow", "rb") as f:
        # Empty batches (the ones that carry grown dictionaries, docs/recording-format.md "Codecs")
        # have no number.
        seqs = [int(m[BATCH_SEQ_KEY]) for b, m in pa.ipc.open_stream(f).iter_batches_with_custom_metadata()
                if b.num_rows]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 4  # numbered afresh: batches, the `repaired` note


# -- bounds ------------------------------------------------------------------------------------
def test_phases_and_counters_past_their_bound_are_left_out(tmp_path, capsys):
    n = MAX_PHASES + 5
    rows = run_rows(4)
    rows += [{"kind": "span", "proc": 0, "name": f"update/p{i:05d}", "parent": "update", "t_ns": MS + i,
              "dur_ns": 10, "iter": 1} for i in range(n)]
    rows += [{"kind": "counter", "proc": 0, "name": f"c{i:05d}", "t_ns": MS + i, "value": 1.0}
             for i in range(MAX_COUNTERS + 3)]
    path = write(tmp_path / "many.arrow", [rows, [end_row()]])
    snap = summarize(open_recording(path))
    assert len(snap.phases) == MAX_PHASES and len(snap.counters) == MAX_COUNTERS
    assert "sample" in {p.name for p in snap.phases}  # the first ones are kept
    out, warning = warning_of(capsys, ["summary", str(path)])
    assert f"{n + 3 - MAX_PHASES:,} {PAST_PHASES}" in warning and f"4 {PAST_COUNTERS}" in warning, warning
    capsys.readouterr()
    assert main(["diff", str(path), str(path), "--json"]) == 0
    assert len([r for r in json.loads(capsys.readouterr().out)["rows"] if r["unit"] == "ms/it"]) == MAX_PHASES


def test_diff_resamples_are_bounded(tmp_path, capsys):
    path = write(tmp_path / "long.arrow", [run_rows(2500), [end_row()]])
    assert "--resamples must be between 100 and 100,000" in one_line_error(
        capsys, ["diff", str(path), str(path), "--resamples", "100000000"])
    err = one_line_error(capsys, ["diff", str(path), str(path), "--resamples", "100000"])
    assert "more than the bound of 16,777,216; use --resamples" in err, err


def test_diff_table_is_bounded(tmp_path, capsys, monkeypatch):
    """Phase series x iterations: the bound (16.8 M values) made small, so a small file passes it."""
    monkeypatch.setattr("marlwatch.validate.MAX_DIFF_VALUES", 50)
    path = run_file(tmp_path / "run.arrow", iterations=30)
    assert "iterations is more than the 50 values a per-iteration table may hold" in one_line_error(
        capsys, ["diff", str(path), str(path)])


def test_read_iterations_keeps_parents_as_three_classes(tmp_path):
    """diff's table keeps a series per phase and parent class, not per parent: a file whose spans
    name 1,000 different parents does not make it 1,000 times larger."""
    rows = run_rows(4)
    rows += [{"kind": "span", "proc": 0, "name": "update/critic", "parent": f"update/x{i}", "t_ns": MS + i,
              "dur_ns": 10, "iter": 1} for i in range(1000)]
    path = write(tmp_path / "parents.arrow", [rows, [end_row()]])
    snap, table = read_iterations(open_recording(path))
    assert len(table.phases) == len(snap.phases) == 3
