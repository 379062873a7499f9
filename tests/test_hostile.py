"""Every reading command, and replay, on hostile recordings.

Each file is crafted with pyarrow (tests/hostile.py): terminal escape sequences, Rich markup,
NaN and infinite values, JSON nested 100,000 deep, duplicated and reordered batches, names just
past the bounds, a column name that is not UTF-8, nothing valid at all. On every one, every
command must end as the README says: exit 0 (with at most one `marlwatch: warning:` line) or
exit 2 with exactly one `marlwatch: ...` line; never a traceback, never a raw control character
on stdout or stderr, and JSON output that is JSON (no NaN). Replay runs headless (App.run_test)
through its keys and must stay up.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from marlwatch.cli import UsageError, main
from marlwatch.recording import SCHEMA, open_recording
from marlwatch.validate import MAX_COUNTERS, MAX_PHASES, MAX_PROCS
from tests.conftest import REPO
from tests.hostile import INFO, MS, end_row, run_rows, write

RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # all but \n
ESC = "\x1b]0;owned\x07\x1b[2J\x1b[31m\x9b1m\u202e"
MARKUP = "[bold red]x[/] [@click=app.screenshot('.','owned.svg')]y[/] [/]"


def _control(d: Path) -> Path:
    info = {**INFO, "algo": "maddpg" + ESC, "env": ESC, "host": ESC, "procs": {"0": "learner" + ESC, "1": ESC},
            "extra": {"config": {"lr": ESC, ESC: 1}}}
    rows = run_rows(phase="update/critic" + ESC, stack="main (a.py:1);f\x1b[2J\x07 (b\x1b.py:2)")
    rows += [{"kind": "counter", "proc": 0, "name": "loss" + ESC, "t_ns": 5 * MS, "value": 1.0},
             {"kind": "event", "proc": 1, "name": "exited" + ESC, "t_ns": 10**9,
              "text": json.dumps({"state": "crashed" + ESC, "error": "boom" + ESC})}]
    return write(d / "control.arrow", [rows, [end_row()]], info=info)


def _markup(d: Path) -> Path:
    info = {**INFO, "algo": MARKUP, "host": MARKUP, "procs": {"0": MARKUP, "1": "x[/]"}}
    rows = run_rows(phase="update/" + MARKUP, stack=f"main (a.py:1);{MARKUP} (b.py:2)")
    rows.append({"kind": "event", "proc": 1, "name": "exited", "t_ns": 10**9,
                 "text": json.dumps({"state": "crashed", "error": MARKUP})})
    return write(d / "markup.arrow", [rows, [end_row()]], info=info)


def _nan(d: Path) -> Path:
    rows = run_rows()
    rows += [{"kind": "core", "core": 0, "t_ns": 5 * MS, "value": v} for v in (math.nan, math.inf, -math.inf)]
    rows += [{"kind": "counter", "proc": 0, "name": "episode_return", "t_ns": 6 * MS, "value": math.nan},
             {"kind": "proc", "proc": 1, "name": "rss_bytes", "t_ns": 6 * MS, "value": math.inf},
             {"kind": "stack", "proc": 0, "name": "update/critic", "t_ns": 6 * MS, "value": math.nan, "text": "a;b"},
             {"kind": "stack", "proc": 0, "name": "update/critic", "t_ns": 7 * MS, "value": 0.0, "text": "a;c"}]
    info = {**INFO, "start_unix": "NaN", "extra": {"latency_bound_ms": -1}}
    raw = json.dumps(info).replace('"NaN"', "NaN")  # a bare NaN: Python's json accepts it, JSON does not
    return write(d / "nan.arrow", [rows, [end_row()]], meta=raw)


def _deep_event(d: Path) -> Path:
    rows = run_rows() + [{"kind": "event", "proc": 1, "name": "crashed", "t_ns": 5 * MS,
                          "text": '{"error": ' + "[" * 100_000 + "]" * 100_000 + "}"}]
    return write(d / "deep-event.arrow", [rows, [end_row()]])


def _deep_meta(d: Path) -> Path:
    return write(d / "deep-meta.arrow", [run_rows(), [end_row()]],
                 meta='{"algo": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _duplicated(d: Path) -> Path:
    batches = [run_rows(4, first=4 * k) for k in range(4)] + [[end_row()]]
    order = [0, 1, 1, 3, 2, 4]  # a batch twice, two swapped
    return write(d / "duplicated.arrow", [batches[i] for i in order], seq=order)


def _duplicated_old(d: Path) -> Path:
    batches = [run_rows(4, first=4 * k) for k in range(3)] + [[end_row()]]
    return write(d / "duplicated-old.arrow", [batches[i] for i in (0, 1, 1, 2, 0, 3)], seq=False)


def _cardinality(d: Path) -> Path:
    """Just past every bound: one phase name, one counter name and one process slot too many."""
    rows = run_rows()
    rows += [{"kind": "span", "proc": 0, "name": f"update/p{i:04d}", "parent": "update", "t_ns": 30 * MS + i,
              "dur_ns": 1000, "iter": 1} for i in range(MAX_PHASES + 1)]
    rows += [{"kind": "counter", "proc": 0, "name": f"gauge{i:04d}", "t_ns": 30 * MS + i, "value": float(i)}
             for i in range(MAX_COUNTERS + 1)]
    rows += [{"kind": "iter", "proc": slot, "t_ns": 40 * MS, "iter": 1} for slot in range(2, MAX_PROCS + 1)]
    info = {**INFO, "procs": {str(s): f"worker {s}" for s in range(MAX_PROCS + 1)}}
    return write(d / "cardinality.arrow", [rows, [end_row()]], info=info)


def _foreign_column(d: Path) -> Path:
    schema = SCHEMA.append(pa.field("zzzzextra", pa.int64()))
    path = write(d / "foreign-column.arrow", [[{**r, "zzzzextra": 1} for r in run_rows()], [end_row()]],
                 schema=schema)
    path.write_bytes(path.read_bytes().replace(b"zzzzextra", b"\xff\x1b[2Jxtra"))  # as long: the file stays whole
    return path


def _wrong_types(d: Path) -> Path:
    info = {**INFO, "procs": {"0": 5, "1": ["x"], "-1": "w", "1e3": "w"}, "pinning": {"0": "x", "1": [1]},
            "versions": [1], "extra": {"config": "x"}, "cores": "many"}
    rows = run_rows() + [{"kind": "spam", "t_ns": 1}, {"kind": "span", "proc": -3, "name": "x", "t_ns": 1, "dur_ns": -1},
                         {"kind": "iter", "proc": 0, "t_ns": 2**62, "iter": 3}]
    return write(d / "wrong-types.arrow", [rows, [end_row()]], info=info)


def _nothing_valid(d: Path) -> Path:
    return write(d / "nothing-valid.arrow", [[{"kind": "core", "core": 0, "t_ns": t, "value": math.nan}
                                              for t in range(20)] + [{"kind": "spam", "t_ns": 1}]])


FILES = {f.__name__.strip("_").replace("_", "-"): f for f in (
    _control, _markup, _nan, _deep_event, _deep_meta, _duplicated, _duplicated_old, _cardinality, _foreign_column,
    _wrong_types, _nothing_valid)}
UNREADABLE = {"deep-meta", "nothing-valid"}  # every command: one line, exit 2


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    return {name: make(d) for name, make in FILES.items()}


COMMANDS: dict[str, list[str]] = {
    "summary": ["summary", "{f}"],
    "summary --json": ["summary", "{f}", "--json"],
    "diff": ["diff", "{f}", "{f}", "--resamples", "200"],
    "diff --json": ["diff", "{f}", "{f}", "--json", "--resamples", "200"],
    "export perfetto": ["export", "{f}", "--to", "perfetto", "-o", "{out}/trace.json"],
    "export parquet": ["export", "{f}", "--to", "parquet", "-o", "{out}/parquet"],
    "export csv": ["export", "{f}", "--to", "csv", "-o", "{out}/csv"],
    "flame text": ["flame", "{f}", "--phase", "update"],
    "flame svg": ["flame", "{f}", "--phase", "update", "--to", "svg"],
    "flame speedscope": ["flame", "{f}", "--phase", "update", "--to", "speedscope"],
    "repair": ["repair", "{f}", "-o", "{out}/repaired.arrow"],
}


def strict_json(text: str):
    def no(const: str):
        raise AssertionError(f"{const} in JSON output")
    return json.loads(text, parse_constant=no)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", FILES)
def test_reading_commands_on_hostile_files(files, tmp_path, capsys, name, command):
    argv = [a.format(f=files[name], out=tmp_path) for a in COMMANDS[command]]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert not RAW.search(out), out
    assert not RAW.search(err), err
    lines = err.splitlines()
    if name in UNREADABLE:  # bad input: exactly one line
        assert code == 2 and len(lines) == 1 and lines[0].startswith("marlwatch: "), err
        return
    assert code == 0, err  # every other file reads: what is valid in it is shown
    assert all(ln.startswith("marlwatch: ") for ln in lines), err
    assert sum(ln.startswith("marlwatch: warning: ") for ln in lines) <= 1, err  # warned once
    if command in ("summary --json", "diff --json", "flame speedscope"):
        strict_json(out)
    elif command == "flame svg":
        ET.fromstring(out)
    elif command == "export perfetto":
        strict_json((tmp_path / "trace.json").read_text())
    elif command == "export parquet":
        assert pq.read_table(tmp_path / "parquet" / "spans.parquet").num_rows > 0
    elif command == "repair":  # what the reader skipped was left out of the repaired file
        rec = open_recording(tmp_path / "repaired.arrow")
        for _ in rec.batches():
            pass
        assert not rec.skipped.rows and not rec.skipped.batches_repeated, rec.skipped


EXPECTED_WARNINGS = {  # what the one warning of `summary` must say, per file
    "nan": ["6 NaN or infinite", "1 out of range", "ignored 2 invalid run metadata entries"],
    "deep-event": ["1 detail not a JSON object"],
    "duplicated": ["skipped 2 batches repeating earlier ones", "1 batch missing from the middle"],
    "duplicated-old": ["skipped 2 batches repeating earlier ones"],
    # 1,001 names and the file's own sample/update/critic; 1,001 gauges and episode_return
    "cardinality": [f"4 past {MAX_PHASES:,} phase names", f"2 past {MAX_COUNTERS:,} counter names",
                    "1 out of range", "ignored 1 invalid run metadata entry"],
    "wrong-types": ["1 of an unknown kind", "2 out of range", "ignored 9 invalid run metadata entries"],
}


@pytest.mark.parametrize("name", EXPECTED_WARNINGS)
def test_summary_says_what_it_left_out(files, capsys, name):
    capsys.readouterr()
    assert main(["summary", str(files[name])]) == 0
    err = capsys.readouterr().err
    for said in EXPECTED_WARNINGS[name]:
        assert said in err, (said, err)


def test_a_real_terminal_gets_no_escape_sequence(files):
    """The same through a real process and real pipes: the bytes written are checked."""
    p = subprocess.run([sys.executable, "-m", "marlwatch", "summary", str(files["control"])], capture_output=True,
                       timeout=120, cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert p.returncode == 0, p.stderr
    for stream in (p.stdout, p.stderr):
        assert not RAW.search(stream.decode("utf-8")), stream
    assert b"\\x1b]0;owned\\x07" in p.stdout


# -- replay, headless --------------------------------------------------------------------------
KEYS = ["end", "home", "space", "f", "f", "right", "[", "s", "down", "question_mark", "escape", "p"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", FILES)
def test_replay_on_hostile_files(files, tmp_path, name, monkeypatch):
    from marlwatch.app.replay import ReplayApp
    from marlwatch.cli.files import load_replay as load

    monkeypatch.chdir(tmp_path)  # where a [@click=app.screenshot(...)] would write
    if name in UNREADABLE:
        with pytest.raises(UsageError) as e:
            load(str(files[name]))
        assert "\n" not in str(e.value)
        return
    playback, status, size = load(str(files[name]))

    async def scenario() -> None:
        app = ReplayApp(playback, str(files[name]), size, status, play=False)
        async with app.run_test(size=(100, 30), notifications=True) as pilot:
            for key in KEYS:
                await pilot.press(key)
            if name == "markup":  # click every row: a [@click=...] that were markup would run
                for y in range(30):
                    await pilot.click(offset=(50, y))
            await pilot.pause(0.2)
            svg = app.export_screenshot()
            assert app.is_running and app.replay_error is None, app.replay_error
            assert not RAW.search(svg)
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())
    assert not list(tmp_path.glob("owned*"))
