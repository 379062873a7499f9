"""`marlwatch replay` driven with Pilot on the shipped recording, and its bad input."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marlwatch.app import REPLAY_HZ
from marlwatch.app.base import TABLE_HZ
from marlwatch.app.replay import ReplayApp
from marlwatch.app.widgets import CoresPanel, PhaseTable, RunHeader, ThroughputPanel, TimePanel, WorkerRow
from marlwatch.cli.files import load_replay as load
from marlwatch.report import ms

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"


def replay_app(**kwargs) -> ReplayApp:
    playback, status, size = load(str(SHIPPED))
    return ReplayApp(playback, "recordings/maddpg-3agents-2workers.arrow", size, status, **kwargs)


def ips_text(app: ReplayApp) -> str:
    return " ".join(t.plain for t in app.query_one(ThroughputPanel).figures())


def refresh_calls(widgets) -> list[tuple[str, bool]]:
    """Record each widget's refreshes from now on: (its id, whether it asked for a layout)."""
    calls: list[tuple[str, bool]] = []
    for w in widgets:
        def spy(*regions, _real=w.refresh, _id=w.id, **kw):
            calls.append((_id, kw.get("layout", False)))
            return _real(*regions, **kw)
        w.refresh = spy
    return calls


def header_text(app: ReplayApp) -> str:
    return app.query_one(RunHeader).plain


@pytest.mark.timeout(60)
def test_panels_repaint_only_what_changed():
    """A refresh that brings the same figures repaints nothing; new figures repaint the panels
    that show them, without laying the screen out again while no panel changes size."""
    async def scenario() -> None:
        app = replay_app(at_s=20.0, play=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.6)
            widgets = [app.query_one(t) for t in (RunHeader, ThroughputPanel, TimePanel, CoresPanel, PhaseTable)]
            widgets += [app.query_one("#phase-body"), *app.query(WorkerRow)]
            calls = refresh_calls(widgets)
            app.refresh_view()  # the same position: the same figures
            await pilot.pause(0.3)
            assert calls == [], calls
            app.playback.seek_s(24.0)
            app.refresh_view()
            await pilot.pause(0.3)
            repainted = {i for i, _ in calls}
            assert {"header", "throughput", "time", "phase-body"} <= repainted, calls
            assert not any(layout for _, layout in calls), calls

    asyncio.run(scenario())


def test_the_tables_follow_at_table_hz_and_a_key_shows_everything():
    """Playing, the throughput and time panels take every refresh's figures, the phase table,
    cores and workers at most TABLE_HZ (docs/benchmarks.md §6); a seek shows all at once."""
    async def scenario() -> None:
        app = replay_app(at_s=12.0, play=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.3)
            table, time_panel = app.query_one(PhaseTable), app.query_one(TimePanel)
            await pilot.press("space")  # play at 1x: REPLAY_HZ refreshes a second
            seen_time, seen_table = set(), set()
            start = time.monotonic()
            window = 3.1 / TABLE_HZ  # a few table periods: tables on every refresh would be seen more often
            while time.monotonic() - start < window:
                await pilot.pause(0.05)
                seen_time.add(id(time_panel.snapshot))
                seen_table.add(id(table.snapshot))
            assert len(seen_time) >= 0.8 * window * REPLAY_HZ, len(seen_time)
            assert 2 <= len(seen_table) <= 1 + window * TABLE_HZ + 1, len(seen_table)
            assert len(seen_table) < len(seen_time)
            await pilot.press("space")  # pause
            await pilot.press("right")  # +1 s: a key shows everything at once
            await pilot.pause(0.1)
            assert table.snapshot is app.snapshot and app.query_one(CoresPanel).snapshot is app.snapshot

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_play_pause_seek_speed():
    async def scenario() -> None:
        app = replay_app(at_s=12.0, play=False)
        async with app.run_test(size=(120, 40)) as pilot:
            pb = app.playback
            await pilot.pause(0.6)
            assert pb.position_s == pytest.approx(12.0) and "❚❚ 1x" in header_text(app)
            first = app.snapshot
            assert first is not None

            await pilot.press("space")  # play
            assert pb.playing and "▶ 1x" in header_text(app)
            # The playhead moves at each refresh, by the wall time since the last one (at 1x):
            # after two periods it has moved at least one and at most two of them.
            period = 1.0 / REPLAY_HZ
            await pilot.pause(2 * period)
            moved = pb.position_s
            assert 12.0 + 0.5 * period < moved < 12.0 + 2 * period + 0.5
            assert app.snapshot.iterations >= first.iterations

            await pilot.press("p")  # pause
            held = pb.position_s
            await pilot.pause(0.6)
            assert not pb.playing and pb.position_s == held

            await pilot.press("f")
            assert pb.speed == 4.0 and "4x" in header_text(app)
            await pilot.press("f", "f")
            assert math.isinf(pb.speed) and "max" in header_text(app)
            await pilot.press("d")
            assert pb.speed == 16.0

            await pilot.press("right")
            assert pb.position_s == pytest.approx(held + 1.0)
            await pilot.press("left", "left")
            assert pb.position_s == pytest.approx(held - 1.0)
            await pilot.press("]")
            assert pb.position_s == pytest.approx(held + 9.0)

            await pilot.press("home")
            assert pb.position_s == 0 and app.snapshot.iterations == 0
            await pilot.press("end")
            assert pb.at_end and app.snapshot.complete and app.snapshot.iterations == 150
            assert "end" in header_text(app)

            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_phase_table_matches_summary_json():
    out = subprocess.run([sys.executable, "-m", "marlwatch", "summary", "--json", str(SHIPPED)],
                         capture_output=True, text=True, timeout=60, check=True)
    summary = json.loads(out.stdout)

    async def scenario() -> None:
        app = replay_app(play=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("end")
            await pilot.pause()
            table = app.query_one(PhaseTable)
            shown = table.displayed()
            assert table.row_count == len(shown) == len(summary["phases"]) > 5
            for i, phase in enumerate(shown):
                want = summary["phases"][phase.name]
                cells = table.cells[i]
                assert cells[0].strip().endswith(phase.name.rsplit("/", 1)[-1] + (" ✉" if want["comm"] else ""))
                assert cells[1] == f"{want['total_s']:.3f}"
                assert cells[3] == str(want["count"])
                assert cells[4:] == [ms(want["p50_ms"]), ms(want["p95_ms"]), ms(want["p99_ms"])]
            # The headline numbers are summary's too.
            time_text = app.query_one(TimePanel).plain
            assert f"{100 * summary['comm_share']:.1f}%" in time_text
            assert f"{100 * summary['comm_share_update']:.1f}%" in time_text
            # ... and so are IPS and start-up (the same definitions on every screen).
            assert f"mean {summary['ips']:.2f}" in ips_text(app)
            assert f"start-up {summary['startup_s']:.1f} s" in str(app.query_one(ThroughputPanel).border_subtitle)
            # Sorting by total puts the biggest first; the hottest is in the subtitle.
            await pilot.press("s")
            assert table.sort_key == "total"
            totals = [float(c[1]) for c in table.cells]
            assert totals == sorted(totals, reverse=True)
            assert "hottest: sync/wait" in str(table.border_subtitle)
            await pilot.press("question_mark")
            assert app.screen.__class__.__name__ == "HelpScreen"
            await pilot.press("x")
            assert app.screen.__class__.__name__ != "HelpScreen"

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_before_the_first_iteration_ends_it_says_starting_up():
    async def scenario() -> None:
        app = replay_app(at_s=6.0, play=False)  # the shipped run's first iteration ends at 7.7 s
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.3)
            assert app.snapshot.startup_s is None
            assert "starting up" in ips_text(app) and "IPS" not in ips_text(app)
            # Spans ship with the first tick: until then no share is shown, not even a zero.
            time_text = app.query_one(TimePanel).plain
            assert "comm / execution" not in time_text and "%" not in time_text, time_text
            await pilot.press("right", "right")  # 8 s: the first iteration is over
            await pilot.pause(0.3)
            assert app.snapshot.startup_s is not None
            assert "IPS now" in ips_text(app)

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_truncated_recording_replays_to_its_last_batch(tmp_path):
    cut = tmp_path / "cut.arrow"
    data = SHIPPED.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.7)])
    playback, status, size = load(str(cut))
    assert status == "truncated mid-batch"

    async def scenario() -> None:
        app = ReplayApp(playback, str(cut), size, status, play=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("end")
            assert "truncated" in header_text(app)
            assert 0 < app.snapshot.iterations < 150 and not app.snapshot.complete
            await pilot.press("q")

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["replay", "/nonexistent/x.arrow"], "no such file"),
        (["replay", str(REPO / "pyproject.toml")], "not an Arrow IPC stream"),
        (["replay", str(SHIPPED), "--speed", "3"], "--speed takes 1, 4, 16 or max"),
        (["replay", str(SHIPPED), "--at", "-1"], "--at takes a number of seconds >= 0"),
        (["replay", str(SHIPPED), "--at", "inf"], "--at takes a number of seconds >= 0"),
        (["replay", str(SHIPPED), "--at", "nan"], "--at takes a number of seconds >= 0"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message):
    out = subprocess.run([sys.executable, "-m", "marlwatch", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marlwatch: ") and message in lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.timeout(60)
def test_keys_queued_behind_the_one_closing_help_do_not_crash_the_app():
    """The help screen (the live app's too) closed on a key and closed again on the next one queued
    before it had left the stack: that popped the app's last screen (ScreenStackError)."""
    from textual import events

    async def scenario() -> None:
        app = replay_app(play=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("question_mark")
            assert app.screen.__class__.__name__ == "HelpScreen"
            # Two keys in the queue at once, as a fast typist or a paste delivers them.
            app.post_message(events.Key("a", "a"))
            app.post_message(events.Key("b", "b"))
            await pilot.pause(0.5)
            assert [s.__class__.__name__ for s in app.screen_stack] == ["Screen"]
            assert app.return_code is None  # still running
            await pilot.press("question_mark")  # and the help still opens and closes
            assert app.screen.__class__.__name__ == "HelpScreen"
            await pilot.press("x")
            assert app.screen.__class__.__name__ != "HelpScreen"
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_panel_asks_for_a_layout_only_when_its_size_can_follow_its_lines():
    """Numbers change width at almost every refresh: a fixed-size panel only repaints; a panel
    whose height is `auto` is laid out again when its number of lines changes (or it would stay
    one line tall and hide the rest)."""
    from rich.text import Text
    from textual.app import App

    from marlwatch.app.widgets import Lines

    class Two(App):
        CSS = "#fixed { height: 2; } #auto { height: auto; }"

        def compose(self):
            yield Lines(id="fixed")
            yield Lines(id="auto")

    async def scenario() -> None:
        app = Two()
        async with app.run_test(size=(80, 10)) as pilot:
            fixed, auto = app.query_one("#fixed", Lines), app.query_one("#auto", Lines)
            for w in (fixed, auto):
                w.show(Text("9.50 IPS"))
            await pilot.pause()
            layouts = refresh_calls([fixed, auto])
            for w in (fixed, auto):
                w.show(Text("10.25 IPS"))  # wider, as many lines
            assert ("fixed", False) in layouts and ("auto", False) in layouts and not any(x for _, x in layouts)
            layouts.clear()
            auto.show(Text("10.25 IPS"), Text("worker 1 crashed"))
            await pilot.pause()
            assert ("auto", True) in layouts
            assert auto.size.height == 2  # laid out again: both lines on screen

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_screen_repainted_line_by_line_is_the_screen_drawn_anew():
    """Panels repaint only the lines that changed: after a seek, the screen must be exactly the
    one an app opened at that point draws from scratch."""
    async def settled(app: ReplayApp, pilot) -> str:
        # Under load, two apps freshly opened at the same point were seen to differ in one style
        # of the header 0.3 s in (the same text): compare screens once they stop changing.
        shot = app.export_screenshot()
        for _ in range(10):
            await pilot.pause(0.2)
            again = app.export_screenshot()
            if again == shot:
                break
            shot = again
        return shot

    async def screen_at(at_s: float, then_s: float | None = None) -> str:
        app = replay_app(at_s=at_s, play=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.3)
            if then_s is not None:
                app.playback.seek_s(then_s)
                app.refresh_view()
                await pilot.pause(0.3)
            return await settled(app, pilot)

    async def scenario() -> None:
        fresh = await screen_at(14.6)
        repainted = await screen_at(14.0, then_s=14.6)
        assert repainted == fresh
        assert await screen_at(14.0) != fresh  # the seek changed what is on screen

    asyncio.run(scenario())
