"""The py-spy panel and the keys around it, driven with Pilot on a shipped recording with samples
(recordings/maddpg-flame.arrow: `marlwatch run --headless --iterations 60 --flame update:2
--flame sample:2`): the first selection is not a wait, the panel closes and opens with a key, 80x24
keeps the phase table usable and every panel visible or reachable, and no hint or footer entry
names a key that does something else on that screen."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from textual.widgets import Static
from textual.widgets._footer import FooterKey

from marlwatch.app.base import WatchApp
from marlwatch.app.flame_panel import TopFunctionsPanel
from marlwatch.app.live import LiveApp
from marlwatch.app.replay import ReplayApp
from marlwatch.app.widgets import CoresPanel, PhaseTable, ThroughputPanel, TimePanel, WorkersPanel
from marlwatch.cli.files import load_replay as load
from marlwatch.metrics import is_wait
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
FLAMED = REPO / "recordings" / "maddpg-flame.arrow"
SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"  # no samples; its hottest phase is sync/wait

pytestmark = pytest.mark.timeout(60)


def flamed_replay() -> ReplayApp:
    """Paused at the end: every capture's samples are in."""
    playback, status, size = load(str(FLAMED))
    return ReplayApp(playback, "recordings/maddpg-flame.arrow", size, status, at_s=10_000, play=False)


def footer(app: WatchApp) -> dict[str, str]:
    """What the footer shows: key as displayed -> description."""
    return {k.key_display: k.description for k in app.query(FooterKey)}


def on_screen(app: WatchApp, panel: type) -> bool:
    """The panel is displayed and lies wholly inside the terminal."""
    w = app.query_one(panel)
    r, screen = w.region, app.screen.region
    return w.display and r.height > 0 and r.y >= 0 and r.bottom <= screen.bottom and r.right <= screen.right


def screen_text(app: WatchApp) -> str:
    return "\n".join(str(w.render()) for w in app.screen.query(Static) if w.display)


def test_first_selection_is_the_hottest_phase_that_is_not_a_wait():
    async def scenario() -> None:
        playback, status, size = load(str(SHIPPED))
        app = ReplayApp(playback, "recordings/maddpg-3agents-2workers.arrow", size, status, at_s=20, play=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.3)
            snap = app.snapshot
            table = app.query_one(PhaseTable)
            # The premise: the hottest phase is a wait (the workers wait while the learner updates).
            assert is_wait(snap.hottest.name), snap.hottest
            chosen = table.selected_phase
            assert chosen == snap.hottest_work.name and not is_wait(chosen), chosen
            work = [p for p in snap.phases if not is_wait(p.name) and p.depth > 0]
            assert max(work, key=lambda p: p.total_s).name == chosen
            # The py-spy panel follows that phase; the hottest is still named as such.
            assert app.query_one(TopFunctionsPanel).phase == chosen
            assert f"hottest: {snap.hottest.name}" in str(table.border_subtitle)

    asyncio.run(scenario())


def test_is_wait_rule():
    assert is_wait("sync/wait") and is_wait("sync/gather") and is_wait("sync") and is_wait("sync/comm/x")
    assert not is_wait("sample/env_step") and not is_wait("update/comm/joint_inputs") and not is_wait(None)
    assert not is_wait("synced/x")


def test_the_panel_closes_and_opens_with_t_and_escape_at_80x24():
    async def scenario() -> None:
        app = flamed_replay()
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.3)
            panel = app.query_one(TopFunctionsPanel)
            table = app.query_one(PhaseTable)
            assert panel.is_open and panel.lines, panel.lines
            # Open at 80x24: the table keeps >= 5 rows; the panel is on screen; Cores and Workers
            # give up their place to it (reachable with t, which the footer shows).
            body = table.query_one("VerticalScroll")
            assert body.size.height >= 5, body.size
            assert table.row_count >= 5
            assert all(on_screen(app, p) for p in (ThroughputPanel, TimePanel, PhaseTable, TopFunctionsPanel))
            assert not app.query_one(CoresPanel).display or not on_screen(app, CoresPanel)
            assert footer(app).get("t") == "py-spy panel"
            assert "t closes" in str(panel.border_subtitle)

            await pilot.press("t")
            await pilot.pause(0.2)
            assert not panel.is_open and not panel.display
            assert all(on_screen(app, p) for p in (ThroughputPanel, TimePanel, PhaseTable, CoresPanel, WorkersPanel))
            assert table.query_one("VerticalScroll").size.height >= 5

            await pilot.press("t")
            await pilot.pause(0.2)
            assert panel.is_open and on_screen(app, TopFunctionsPanel)
            await pilot.press("escape")
            await pilot.pause(0.2)
            assert not panel.is_open and on_screen(app, WorkersPanel)
            # A refresh does not bring it back (no new samples) ...
            await pilot.press("right")
            await pilot.pause(0.2)
            assert not panel.is_open
            # ... new samples do: seek back before the captures, then forward over them.
            await pilot.press("home")
            await pilot.pause(0.2)
            assert not panel.has_samples and "t" not in footer(app)
            await pilot.press("end")
            await pilot.pause(0.2)
            assert panel.is_open and on_screen(app, TopFunctionsPanel)

    asyncio.run(scenario())


def test_replay_names_only_its_own_keys():
    async def scenario() -> None:
        app = flamed_replay()
        async with app.run_test(size=(80, 24)) as pilot:
            # The keys that matter in replay; seek keys are in `?` only.
            expected = {"↑↓": "select", "q": "quit", "s": "sort", "?": "help", "t": "py-spy panel",
                        "space": "play/pause", "f/d": "speed"}
            await wait_for(pilot, lambda: footer(app) == expected, 10, "the footer's keys", lambda: footer(app))
            # A phase without samples: the panel says so without sending to `f` (faster here).
            table = app.query_one(PhaseTable)
            sampled = set(app.snapshot.stacks)
            for _ in range(len(table.displayed())):
                if table.selected_phase is not None and not any(
                        n == table.selected_phase or n.startswith(table.selected_phase + "/") for n in sampled):
                    break
                await pilot.press("down")
            panel = app.query_one(TopFunctionsPanel)
            assert not panel.lines, table.selected_phase
            text = screen_text(app)
            assert "up to this point of the recording" in text
            assert "press f" not in text and "f to profile" not in text and "f profiles" not in text
            await pilot.press("question_mark")
            await wait_for(pilot, lambda: "t or escape" in screen_text(app), 10, "the help")
            help_text = screen_text(app)
            assert "f faster" in help_text and "f profiles" not in help_text and "t or escape" in help_text
            assert "from their time on" in help_text

    asyncio.run(scenario())


def test_live_names_its_keys(tmp_path):
    # The live app on a run that is never started: its footer and help before any sample.
    from marlwatch.runner import Run, RunConfig
    from tests.scripted_run import ScriptedLauncher

    run = Run(RunConfig(record=str(tmp_path / "x.arrow")), launcher=ScriptedLauncher())

    async def scenario() -> None:
        app = LiveApp(run)
        app.pump_run = lambda: None  # nothing to pump: the run is not started
        async with app.run_test(size=(80, 24)) as pilot:
            expected = {"↑↓": "select", "q": "quit", "p": "pause", "s": "sort", "?": "help", "f": "py-spy"}
            await wait_for(pilot, lambda: footer(app) == expected, 10, "the footer's keys", lambda: footer(app))
            await pilot.press("question_mark")
            await wait_for(pilot, lambda: "t or escape" in screen_text(app), 10, "the help")
            help_text = screen_text(app)
            assert "f profiles the selected phase" in help_text and "f py-spy on it" in help_text
            assert "t or escape" in help_text

    asyncio.run(scenario())
