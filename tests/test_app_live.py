"""`marlwatch run` with the app: its behaviour on a scripted run (tests/scripted_run.py: a shipped
recording played through a real monitor), one real run in a real terminal, and bad input before the app."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from marlwatch.app.live import UI_NICE, LiveApp
from marlwatch.app.replay import ReplayApp
from marlwatch.app.widgets import CoresPanel, PhaseTable, RunHeader, TimePanel, WorkerRow
from marlwatch.cli import main
from marlwatch.cli.files import load_replay as load
from marlwatch.metrics import summarize
from marlwatch.recording import open_recording
from tests.conftest import REPO, wait_for
from tests.scripted_run import scripted_run

QUICK = ["--set", "warmup=512", "--set", "batch_size=128"]
FLAMED = REPO / "recordings" / "maddpg-flame.arrow"  # 2 workers; start-up 21 s, then warm-up until 28 s


@pytest.mark.timeout(60)
def test_live_run_fills_panels_and_q_stops_it(tmp_path):
    # At 4x the 28 s recording runs for 7 s: the table panels (TABLE_HZ) see it running, even on
    # a loaded machine (at the default 10x they could miss it).
    run, _ = scripted_run(tmp_path, hold=True, speed=4.0)
    app = LiveApp(run)

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            def filled() -> bool:
                # The table panels' snapshot: they follow the others at TABLE_HZ.
                s = app.query_one(CoresPanel).snapshot
                return (s is not None and s.ips_now > 0 and s.iterations >= 3 and len(s.phases) >= 5
                        # This machine's cores, sampled for real: on an idle machine they can all
                        # read 0 % at every sample the panel is given, so only their number is certain.
                        and len(s.cores_now) == psutil.cpu_count() and all(0 <= u <= 100 for u in s.cores_now)
                        and any(p.state == "running" for p in s.procs))

            def seen() -> str:
                s = app.query_one(CoresPanel).snapshot
                return "no snapshot" if s is None else (
                    f"ips_now {s.ips_now} iterations {s.iterations} phases {len(s.phases)} cores {s.cores_now} "
                    f"procs {[p.state for p in s.procs]} t {s.t_s}")

            await wait_for(pilot, filled, 30, "non-zero IPS, phases and cores", seen)
            s = app.snapshot
            assert "LIVE" in app.query_one(RunHeader).plain
            # The table follows at TABLE_HZ: it shows every phase of the snapshot it was last given.
            table = app.query_one(PhaseTable)
            assert table.snapshot is not None and table.row_count == len(table.snapshot.phases) >= 5
            cores_text = app.query_one(CoresPanel).plain
            assert "cpu0" in cores_text and "learner" in cores_text
            # And the panel is tall enough to show them all (it once stayed one line tall, the
            # height of "sampling…", and hid every core but the first).
            panel = app.query_one(CoresPanel)
            await wait_for(pilot, lambda: panel.content_size.height >= len(s.cores_now) + len(s.procs), 10,
                           "the cores panel to grow", lambda: panel.content_size)
            rows = list(app.query(WorkerRow))
            assert len(rows) == 3 and any(r.has_class("-running") for r in rows)
            assert "comm / execution" in time_panel_text(app) and "warming up" not in time_panel_text(app)

            await pilot.press("p")  # pause the view: the figures hold still while the run goes on
            held = app.snapshot
            await wait_for(pilot, lambda: app.latest.snapshot is not held, 10, "a new snapshot (the run goes on)")
            assert app.snapshot is held and "paused" in app.query_one(RunHeader).plain
            await pilot.press("p")
            await wait_for(pilot, lambda: app.snapshot is not held, 5, "the view to resume")

            await pilot.press("q")
            await wait_for(pilot, lambda: app.ended is not None, 30, "the run to stop")
        assert app.return_code == 0 and not app.interrupted and app.ended.failure is None

    asyncio.run(scenario())
    assert run.stop_reason == "stopped by user" and summarize(open_recording(run.record_path)).complete


def time_panel_text(app) -> str:
    return app.query_one(TimePanel).plain


@pytest.mark.timeout(60)
def test_warmup_is_labelled_live_and_in_replay(tmp_path):
    """While MADDPG fills its replay buffer the breakdown says so instead of showing 0.0% shares,
    and a replay of the recording says the same."""
    run, _ = scripted_run(tmp_path, FLAMED, until_s=25.0)  # stops playing inside the warm-up
    app = LiveApp(run)

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.warmup is not None
                           and app.snapshot.t_s >= 24.0, 30, "warm-up progress")
            await pilot.pause(0.3)
            w = app.snapshot.warmup
            assert w.active and 0 < w.done < 2048 and w.needed == 2048 and w.unit == "transitions"
            text = time_panel_text(app)
            assert f"warming up {w.done:,.0f}/2,048 transitions" in text, text
            assert "comm / execution" not in text and "0.0%" not in text.split("\n", 2)[-1]
            await pilot.press("q")
            await wait_for(pilot, lambda: app.ended is not None, 30, "the run to stop")

    asyncio.run(scenario())
    final = summarize(open_recording(run.record_path)).warmup
    assert final is not None and final.active

    async def replay() -> None:
        playback, status, size = load(str(run.record_path))
        rapp = ReplayApp(playback, str(run.record_path), size, status, at_s=playback.duration_s, play=False)
        async with rapp.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: rapp.snapshot is not None and rapp.snapshot.warmup == final, 10,
                           "the replay's end", lambda: rapp.snapshot and rapp.snapshot.warmup)
            assert f"warming up {final.done:,.0f}/2,048 transitions" in time_panel_text(rapp)

    asyncio.run(replay())


@pytest.mark.timeout(60)
def test_live_run_that_finishes_stays_on_screen(tmp_path):
    run, launcher = scripted_run(tmp_path, speed=30.0)
    app = LiveApp(run)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.ended is not None, 30, "the run to finish")
            await wait_for(pilot, lambda: "FINISHED" in app.query_one(RunHeader).plain, 10, "FINISHED")
            assert launcher.done and run.failure is None
            assert app.snapshot.iterations == 150
            # The end-of-run marker reached the view through the same Metrics as every other row.
            assert app.snapshot.complete
            assert all(r.has_class("-finished") for r in app.query(WorkerRow))
            # Nothing left to profile: `f` is no longer offered, by the footer or the py-spy panel.
            from textual.widgets._footer import FooterKey

            def keys() -> set[str]:
                return {k.key_display for k in app.query(FooterKey)}

            # The footer recomposes after the bindings change, a moment after the header shows it.
            await wait_for(pilot, lambda: "f" not in keys() and "q" in keys(), 10, "the footer without f",
                           lambda: str(keys()))
            assert app.query_one("#flame").hint == ""
            await pilot.press("ctrl+c")  # same as q
        assert app.interrupted  # `marlwatch run` exits 130

    asyncio.run(scenario())
    rec = open_recording(run.record_path)
    assert rec.read_all().num_rows > 0 and rec.complete


@pytest.mark.timeout(60)
def test_killed_worker_shows_crash_and_exits_1(tmp_path):
    run, _ = scripted_run(tmp_path, crash_at=(1, 15.0))
    app = LiveApp(run)

    async def scenario() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.ended is not None, 30, "the run to stop")
            await wait_for(pilot, lambda: "FAILED" in app.query_one(RunHeader).plain, 10, "FAILED")
            crashed = app.query_one("#proc-1", WorkerRow)
            assert crashed.has_class("-crashed") and "SIGKILL" in (crashed.row.error or "")
            await pilot.press("q")
        assert app.ended.failure  # `marlwatch run` exits 1

    asyncio.run(scenario())
    assert run.failure and "SIGKILL" in run.failure
    assert 0 < summarize(open_recording(run.record_path)).iterations < 150  # stopped at the crash


class TmuxPane:
    """`marlwatch ARGS` in a detached 100x30 tmux pane, as a user runs it in a terminal; its exit
    status goes to a file when it ends. The session is killed on leaving the `with`."""

    def __init__(self, tmp_path: Path, args: str, name: str) -> None:
        self.status = tmp_path / f"{name}.status"
        self.session = f"mw{name}{os.getpid()}"
        cmd = f"{Path(sys.executable).with_name('marlwatch')} {args}; echo $? > {self.status}"
        self.pid = int(subprocess.run(["tmux", "new-session", "-d", "-s", self.session, "-x", "100", "-y", "30", "-P",
                                       "-F", "#{pane_pid}", cmd], capture_output=True, text=True, check=True).stdout)

    def __enter__(self) -> TmuxPane:
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)

    def wait_for_screen(self, shown, timeout: float, what: str) -> str:
        """The pane's text once `shown(text)` holds, or fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        screen = ""
        while not shown(screen):
            assert time.monotonic() < deadline, f"{what}:\n{screen}"
            time.sleep(0.5)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.session], capture_output=True,
                                    text=True).stdout
        return screen

    def exit_status(self, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while not self.status.exists() or not self.status.read_text().strip():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)
        return self.status.read_text().strip()


@pytest.mark.timeout(150)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_real_terminal_q_exits_cleanly(tmp_path):
    """`marlwatch run` in a tmux pane, as a user runs it: every panel drawn, q ends it, exit 0."""
    record = tmp_path / "tty.arrow"
    with TmuxPane(tmp_path, f"run --workers 1 --record {record} {' '.join(QUICK)}", "tty") as pane:
        screen = pane.wait_for_screen(lambda s: "sample" in s and " it 0 " not in s, 100,
                                      "the app did not show iterations")
        for title in ("LIVE", "Throughput", "Where the time goes", "Phases", "Cores", "Workers", "q quit"):
            assert title in screen
        children = psutil.Process(pane.pid).children(recursive=True)
        assert len(children) >= 2  # the monitor and its run
        if sys.platform.startswith("linux"):
            # The UI thread (the monitor's main thread) draws at a lower priority than the run;
            # the run's thread (it drains the pipes) and the run's processes keep the user's.
            monitor = next(c for c in children if c.ppid() == pane.pid)
            threads = {t.id: psutil.Process(t.id).nice() for t in monitor.threads()}
            user = psutil.Process(pane.pid).nice()
            assert threads.pop(monitor.pid) == min(19, user + UI_NICE)
            assert user in threads.values()
            assert {c.nice() for c in children if c.pid != monitor.pid} == {user}
        subprocess.run(["tmux", "send-keys", "-t", pane.session, "q"], check=True)
        assert pane.exit_status(30, "q did not end the app") == "0"
        # Before the session is killed (which would end any child left behind). multiprocessing's
        # resource tracker and fork server end after the monitor, when they see it gone; the fork
        # server finalises torch first (about 0.4 s here).
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE]
    rec = open_recording(record)
    assert rec.read_all().num_rows > 0 and rec.complete



@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_terminal_closed_under_a_running_app_ends_it_and_finishes_the_recording(tmp_path):
    """The terminal goes away mid-run (an SSH session dropped, a tmux session killed): SIGHUP comes
    with SIGCONT, and writes to the terminal fail from then on. The monitor must finish the
    recording and end, leaving no process behind. It once hung for ever in Textual's shutdown
    (SIGCONT restarted Textual's output thread on the dead terminal; that thread died at its first
    write, and the shutdown's writes then waited for it); this run does not always lose that race."""
    record = tmp_path / "hup.arrow"
    with TmuxPane(tmp_path, f"run --workers 2 --iterations 100000 --record {record} {' '.join(QUICK)}", "hup") as pane:
        pane.wait_for_screen(lambda s: "sample" in s and " it 0 " not in s, 100, "the app did not show iterations")
        time.sleep(5)  # a few redraws: the output thread has written to the terminal
        monitor = psutil.Process(pane.pid).children()[0]
        processes = [monitor, *monitor.children(recursive=True)]
        subprocess.run(["tmux", "kill-session", "-t", pane.session], check=True)
        _, alive = psutil.wait_procs(processes, timeout=40)
        left = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        for p in left:
            p.kill()  # a hung monitor must not outlive the test
        assert not left, "processes left after the terminal closed"
    rec = open_recording(record)
    assert rec.read_all().num_rows > 0 and rec.complete


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
def test_real_terminal_sigterm_after_the_run_ended_leaves_the_app(tmp_path):
    """The app stays open on a finished run until q; a SIGTERM (a job scheduler, `timeout`, a
    closed SSH session's SIGHUP alike) must still end it, with 128 + 15."""
    record = tmp_path / "done.arrow"
    with TmuxPane(tmp_path, f"run --record {record} -- {sys.executable} -c 'pass'", "term") as pane:
        pane.wait_for_screen(lambda s: "FINISHED" in s, 60, "the app did not show the run as finished")
        psutil.Process(pane.pid).children()[0].send_signal(signal.SIGTERM)  # the monitor
        assert pane.exit_status(20, "SIGTERM did not end the app of a finished run") == "143"
    rec = open_recording(record)
    assert rec.read_all().num_rows > 0 and rec.complete


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--agents", "0"], "--agents must be at least 1"),
        (["--algo", "nope"], "nope"),
        (["--set", "batch_size"], "--set takes KEY=VALUE"),
        (["--record", "/etc/passwd/x.arrow"], "cannot write recording"),
        (["--refresh", "0"], "--refresh must be between"),
    ],
)
def test_bad_input_fails_before_the_app(argv, message, capsys):
    assert main(["run", *argv]) == 2  # the app would wait for keys here: the test would time out
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("marlwatch: ") and message in lines[0]
    assert out.out == ""


def test_a_bad_blank_window_fails_before_the_app(monkeypatch, capsys):
    monkeypatch.setenv("MARLWATCH_APP_BLANK_S", "soon")
    assert main(["run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "MARLWATCH_APP_BLANK_S must be a number of seconds" in lines[0]


@pytest.mark.timeout(60)
def test_blank_windows_draw_nothing(tmp_path):
    """bench_app's in-run A/B: with blank_s the app makes and shows snapshots only in every other
    window of the run's clock, and the figures are whole again once it draws."""
    from marlwatch.app.live import AB_EVENT, blank_window

    run, _ = scripted_run(tmp_path, hold=True)
    app = LiveApp(run, blank_s=0.5, refresh_hz=4.0)
    made: list[int] = []
    real = app.metrics.snapshot

    def snapshot():
        made.append(run.now_ns())
        return real()

    app.metrics.snapshot = snapshot

    async def scenario() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            made.clear()  # the one on mount
            # Waits for windows, not for a stretch of the run's clock: on a loaded machine (CI) one
            # pump of the run's loop can outlast a whole 0.5 s window, which then draws nothing.
            await wait_for(pilot, lambda: len({t // app.blank_ns for t in made}) >= 3, 30,
                           "snapshots in three windows", lambda: made)
            drawn = [t for t in made if not blank_window(t, app.blank_ns)]
            # Every snapshot fell in a drawing window, so the blank ones between those three made none.
            assert drawn == made, made
            await pilot.press("q")
            # Until the run has ended, snapshots keep coming: leaving run_test before that tears the
            # screen down under them (a real app exits only once the run has ended).
            await wait_for(pilot, lambda: app.ended is not None, 30, "the run to stop")

    asyncio.run(scenario())
    # Each window's start is in the recording, with the monitor's CPU time then.
    events = [e for e in summarize(open_recording(run.record_path)).events if e["name"] == AB_EVENT]
    assert len(events) >= 4
    assert [e["drawing"] for e in events] == [not blank_window(int(e["t_s"] * 1e9), app.blank_ns) for e in events]
    assert {e["drawing"] for e in events} == {True, False}
    assert all(b["cpu_s"] >= a["cpu_s"] and b["t_s"] > a["t_s"] for a, b in zip(events, events[1:], strict=False))
