"""Recorded strings are text: escape sequences never reach the terminal, markup never acts.

A crafted recording puts terminal escape sequences and Rich/Textual markup in phase names, roles,
metadata, event details and py-spy frames; every command that shows them (summary, diff, flame,
error messages, replay) must show them as visible text.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from marlwatch.app.replay import ReplayApp
from marlwatch.app.widgets import PhaseTable, WorkersPanel
from marlwatch.cli import main
from marlwatch.cli.files import load_replay as load
from marlwatch.cli.files import run_app
from marlwatch.terminal import finite, printable
from tests.conftest import REPO, wait_for
from tests.hostile import INFO, end_row, run_file, run_rows, write

ESC = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202e"
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e]")  # what must never be printed (but \n)
CLICK = "[@click=app.screenshot('{dir}','clicked.svg')]here[/]"


def test_printable_escapes_what_acts_on_a_terminal_and_keeps_text():
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("\x07\x9b\x7f") == "\\x07\\x9b\\x7f"
    assert printable("left\u202eright") == "left\\u202eright"
    assert printable("bad\udcffpath") == "bad\\udcffpath"  # an undecodable byte of a path
    assert printable("update/comm ✉ é 进度") == "update/comm ✉ é 进度"
    assert printable("a\nb") == "a\\x0ab" and printable("a\nb\tc", newlines=True) == "a\nb\\x09c"
    assert printable(5) == "5" and printable(["x"]) == "['x']"


def test_finite_makes_json_without_nan():
    out = finite({"a": float("nan"), "b": [1.0, float("inf"), (float("-inf"), 2)], "c": "nan"})
    assert out == {"a": None, "b": [1.0, None, [None, 2]], "c": "nan"}
    json.dumps(out, allow_nan=False)


@pytest.fixture
def escaped(tmp_path) -> Path:
    """Escape sequences in the metadata, a phase name, a role, a crash message and py-spy frames."""
    info = {**INFO, "algo": "maddpg" + ESC, "host": ESC, "procs": {"0": "learner" + ESC, "1": "worker 1"},
            "extra": {"config": {"lr": ESC}}}
    phase = "update/critic" + ESC
    rows = run_rows(phase=phase, stack="main (a.py:1);evil\x1b[2J\x9b31m\u202e (b.py:2)")  # `;` splits frames
    rows.append({"kind": "event", "proc": 1, "name": "exited", "t_ns": 10**9,
                 "text": json.dumps({"state": "crashed" + ESC, "error": "boom" + ESC})})
    return write(tmp_path / "escaped.arrow", [rows, [end_row()]], info=info)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_text_commands_show_escape_sequences_as_text(capsys, escaped, tmp_path):
    other = run_file(tmp_path / "plain.arrow")
    for argv in (["summary", str(escaped)], ["diff", str(other), str(escaped), "--resamples", "100"],
                 ["flame", str(escaped), "--phase", "update", "--to", "text"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        assert not RAW.search(out) and not RAW.search(err), (argv, out)
        assert "\\x1b[2J\\x9b31m\\u202e" in out, (argv, out)


def test_flame_svg_of_escaped_frames_is_well_formed_xml(capsys, escaped):
    code, out, err = run_cli(capsys, "flame", str(escaped), "--phase", "update", "--to", "svg")
    assert code == 0, err
    svg = ET.fromstring(out)  # control characters are not allowed anywhere in XML
    assert any("evil\\x1b" in (t.text or "") for t in svg.iter("{http://www.w3.org/2000/svg}title"))


def test_error_messages_show_paths_and_file_contents_as_text(capsys, tmp_path):
    code, out, err = run_cli(capsys, "summary", str(tmp_path / f"no{ESC}.arrow"))
    assert code == 2 and not RAW.search(err) and err.count("\n") == 1 and "no\\x1b]0;owned" in err
    bad = write(tmp_path / "bad.arrow", [run_rows()], meta=json.dumps({**INFO, "agents": "3" + ESC}))
    code, out, err = run_cli(capsys, "summary", str(bad))
    assert code == 2 and not RAW.search(err) and err.count("\n") == 1, err


def test_a_path_that_is_not_text_gives_one_line(tmp_path):
    """A file name with a byte that is not UTF-8 reaches Python as a lone surrogate; printing it
    raw raised UnicodeEncodeError (a traceback) instead of the one-line message."""
    name = os.fsencode(tmp_path) + b"/run-\xff\x1b[2J.arrow"
    p = subprocess.run([sys.executable, "-m", "marlwatch", "summary", name], capture_output=True, timeout=60,
                       cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert p.returncode == 2, p.stderr
    assert p.stderr.count(b"\n") == 1 and b"\x1b" not in p.stderr and b"\\udcff\\x1b[2J" in p.stderr, p.stderr


# -- the app ------------------------------------------------------------------------------------
def screen_text(app) -> str:
    """What the screen shows, as text: the characters of Textual's SVG screenshot."""
    svg = app.export_screenshot()
    return html.unescape("".join(re.findall(r"<text[^>]*>([^<]*)</text>", svg))).replace("\xa0", " ")


@pytest.mark.timeout(90)
def test_replay_shows_markup_as_text_and_clicks_do_nothing(tmp_path):
    """A phase name styled the border, `x[/]` crashed the app, `[@click=...]` ran an app action
    (this one would write a screenshot into tmp_path)."""
    click = CLICK.format(dir=tmp_path)
    info = {**INFO, "algo": "[b]maddpg[/b]", "procs": {"0": "[red]learner", "1": "x[/]" + ESC}}
    rows = run_rows(phase="update/" + click) + run_rows(phase="update/x[/]", iterations=2)
    rows.append({"kind": "event", "proc": 1, "name": "exited", "t_ns": 10**9,
                 "text": json.dumps({"state": "crashed", "error": "[bold]boom x[/]" + ESC})})
    path = write(tmp_path / "markup.arrow", [rows, [end_row()]], info=info)

    async def scenario() -> None:
        playback, status, size = load(str(path))
        app = ReplayApp(playback, str(tmp_path / "runs" / "[exp1]" / "markup.arrow"), size, status, play=False)
        async with app.run_test(size=(150, 40), notifications=True) as pilot:
            await pilot.press("end")
            table = app.query_one(PhaseTable)
            # Shown, escaped as markup.
            await wait_for(pilot, lambda: "[@click=app.screenshot" in (table.border_subtitle or ""), 10,
                           "the phase table's subtitle", lambda: table.border_subtitle)
            # Click along every row of the screen, borders included, but the footer: its keys are
            # the app's own buttons (x=60 there is "space play/pause", which rightly replays from
            # the start).
            for y in range(0, 39):
                await pilot.click(offset=(60, y))
            assert playback.at_end and not playback.playing
            screen = screen_text(app)
            for shown in ("[b]maddpg[/b]", "[exp1]", "[red]learner", "[bold]boom x[/]\\x1b]0;owned",
                          "x[/]\\x1b]0;owned", "update/[@click=app.screenshot"):
                assert shown in screen, (shown, screen)
            assert not RAW.search(screen)
            # A notice quoting a path or a name (a flame message, a failure) is plain text too.
            app.notify("runs/[exp1] x[/] [@click=app.quit]q[/]\x1b[2J", title="[b]x[/]")  # one toast line
            await wait_for(pilot, lambda: "[b]x[/]" in screen_text(app), 10, "the toast")
            screen = screen_text(app)
            assert "runs/[exp1] x[/] [@click=app.quit]q[/]\\x1b[2J" in screen and "[b]x[/]" in screen
            assert not RAW.search(screen)
            assert app.query_one(WorkersPanel) is not None and app.is_running
        assert app.return_code in (None, 0)
        assert not list(tmp_path.glob("clicked*"))

    asyncio.run(scenario())


@pytest.mark.timeout(90)
def test_replay_shows_an_error_it_did_not_expect_and_keeps_running(tmp_path):
    """The file is replaced after replay indexed it: reading on fails, and the replay says so
    and pauses instead of dying."""
    path = run_file(tmp_path / "run.arrow")

    async def scenario() -> None:
        playback, status, size = load(str(path))
        app = ReplayApp(playback, str(path), size, status, play=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.2)
            path.write_bytes(b"not an arrow stream any more" * 10)
            await pilot.press("end")
            await pilot.pause(0.3)
            assert app.is_running and app.replay_error and not app.playback.playing
            assert "[error]" in app.status().detail
            await pilot.press("space")  # playing again fails the same way, and says so again
            await pilot.pause(0.5)
            assert app.is_running and not app.playback.playing
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


class _Crashing(ReplayApp):
    def on_mount(self) -> None:
        raise RuntimeError("a bug in the app")


@pytest.mark.timeout(60)
def test_an_app_crash_exits_non_zero(tmp_path, capsys):
    path = run_file(tmp_path / "run.arrow")
    playback, status, size = load(str(path))
    assert run_app(_Crashing(playback, str(path), size, status, play=False), headless=True) == 1
