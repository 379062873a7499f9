"""py-spy in the app: `--auto-flame` and the `f` key on a selected phase, driven with Pilot on a
real run; the top-functions panel; the latency bound in the throughput panel."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from marlwatch.app.flame_panel import TopFunctionsPanel
from marlwatch.app.live import LiveApp
from marlwatch.app.widgets import PhaseTable, ThroughputPanel
from marlwatch.cli.parser import build_parser
from marlwatch.cli.run import make_flame, make_run, start_run
from marlwatch.recording import open_recording
from tests.conftest import wait_for


@pytest.mark.timeout(170)
def test_auto_flame_then_f_on_the_selected_phase(tmp_path: Path, no_leftovers):
    # Updates start after a warm-up of 160 iterations (16,000 transitions; 6 s or more at the ~25 IPS
    # of an idle machine, longer under load), after --auto-flame took its baseline window (the first
    # 2 s window with 5 iterations past the start-up); then the workers wait for weights while the
    # learner updates: the p95 of their `sync/wait` jumps and --auto-flame profiles it.
    args = build_parser().parse_args(
        ["run", "--workers", "1", "--agents", "3", "--record", str(tmp_path / "live.arrow"), "--auto-flame",
         "--latency-bound", "500", "--set", "batch_size=256", "--set", "warmup=16000"])
    run = make_run(args, default_iterations=None)
    start_run(run)
    flame = make_flame(run, args, always=True)
    # Captures of 1 s (the f key's and the auto trigger's; 5 s by default): 100 samples at py-spy's
    # 100 Hz, plenty for the panel.
    flame.auto_seconds = 1.0
    app = LiveApp(run, flame)
    app.FLAME_SECONDS = 1.0

    async def scenario() -> None:
        async with app.run_test(size=(120, 44)) as pilot:
            panel = app.query_one(TopFunctionsPanel)
            await wait_for(pilot, lambda: app.snapshot is not None and len(app.snapshot.phases) >= 5, 90,
                           "phases")
            assert not panel.has_class("-has-samples")  # nothing sampled yet: no panel
            # The throughput panel shows the latency-bounded IPS (bound from --latency-bound).
            ips_text = " ".join(t.plain for t in app.query_one(ThroughputPanel).figures())
            assert "≤500 ms" in ips_text, ips_text
            await wait_for(pilot, lambda: bool(app.flame.done), 120, "auto-flame to profile a phase",
                           lambda: f"{app.snapshot.iterations} iterations, messages {app.flame.messages}")
            auto = [m for m in app.flame.messages if m.startswith("flame: auto: ")]
            assert len(auto) == 1, app.flame.messages
            await wait_for(pilot, lambda: panel.has_class("-has-samples"), 10, "the top-functions panel")
            # The panel shows what Metrics counted: the stored samples, per phase.
            assert {p: sum(f.values()) for p, f in app.snapshot.stacks.items()} == app.flame.done[0]["phases"]

            # A phase with no samples: the panel says how to get some on this screen (f here).
            table = app.query_one(PhaseTable)
            names = [p.name for p in table.displayed()]
            for _ in range(len(names)):
                if not panel.lines:
                    break
                await pilot.press("down")
            assert not panel.lines and "; press f to profile it" in str(panel.render()), panel.render()

            # Select `sample` with the arrow keys and press f: py-spy on the worker.
            for _ in range(len(names)):
                if table.selected_phase == "sample":
                    break
                await pilot.press("down")
            assert table.selected_phase == "sample"
            await pilot.press("f")
            await wait_for(pilot, lambda: len(app.flame.done) >= 2, 60, "the f capture")
            assert app.flame.done[1]["phase"] == "sample" and app.flame.done[1]["slots"] == [1]
            await wait_for(pilot, lambda: bool(panel.lines), 10, "top functions of sample")
            assert "sample" in str(panel.border_title)
            assert sum(n for _, n in panel.lines) > 0
            assert not any("MADDPGLearner" in f for f, _ in panel.lines)  # rollout code only
            await pilot.press("q")
            await wait_for(pilot, lambda: app.ended is not None, 30, "the run to stop")

    asyncio.run(scenario())
    table = open_recording(run.record_path).read_all()
    kinds = table.column("kind").to_pylist()
    assert "stack" in kinds
    names = [n for n, k in zip(table.column("name").to_pylist(), kinds, strict=True) if k == "event"]
    assert names.count("flame_done") == 2
