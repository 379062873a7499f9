"""Latency-bounded throughput and the sweep report, on hand-made sweep results with known answers.

The recordings here are written by hand (RecordingWriter, like a run's monitor), with iteration
latencies and phase times chosen so that every figure is known: IPS = 1000 / latency (ms), p99,
update time growing exactly 8x per doubling of agents, communication exactly half of update.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pyarrow as pa
import pytest

from marlwatch.metrics import BoundCandidate, latency_bounded_choice, within_latency_bound
from marlwatch.recording import SCHEMA, RecordingWriter, RunInfo
from marlwatch.sweep import bound_choices, bound_lines, table
from tests.conftest import marlwatch

MS = 1_000_000


def cand(agents: int, workers: int, ips: float, p99: float, algo: str = "tom2c") -> BoundCandidate:
    return BoundCandidate(algo, agents, (("workers", workers),), ips, p99)


# -- the choice itself -------------------------------------------------------------------------------
def test_highest_ips_within_the_bound_wins_and_the_gaps_are_ratios() -> None:
    cands = [cand(4, 1, 2.0, 300), cand(4, 2, 3.0, 450), cand(4, 4, 3.5, 900)]
    (ch,) = latency_bounded_choice(cands, 500)
    assert ch.best == cands[1] and ch.lbt == 3.0
    assert [(c.setting, ok, ratio) for c, ok, ratio in ch.rows] == [
        ((("workers", 1),), True, 1.5),  # the best is 1.5x the 1-worker setting
        ((("workers", 2),), True, 1.0),
        ((("workers", 4),), False, pytest.approx(3.0 / 3.5)),  # faster, but over the bound
    ]
    # A looser bound admits the fastest setting; a tighter one admits none (LBT 0).
    assert latency_bounded_choice(cands, 900)[0].best == cands[2]
    none = latency_bounded_choice(cands, 100)[0]
    assert none.best is None and none.lbt == 0.0 and all(r is None for _, _, r in none.rows)


def test_the_choice_is_per_algorithm_and_agent_count_and_ties_go_to_fewer_workers() -> None:
    cands = [cand(8, 2, 1.0, 10), cand(8, 1, 1.0, 10), cand(2, 2, 5.0, 10), cand(2, 1, 4.0, 10),
             cand(2, 1, 9.0, 10, algo="neurcomm")]
    choices = latency_bounded_choice(cands, 50)
    assert [(c.algo, c.agents, dict(c.best.setting)["workers"]) for c in choices] == [
        ("neurcomm", 2, 1), ("tom2c", 2, 2), ("tom2c", 8, 1)]
    assert choices[2].to_json()["best"] == {"workers": 1}


def test_within_the_bound_means_p99_at_most_the_bound() -> None:
    assert within_latency_bound(500.0, 500.0) and not within_latency_bound(500.1, 500.0)
    assert not within_latency_bound(math.nan, 500.0)  # no iteration: no evidence it meets the bound


# -- hand-made sweep recordings ----------------------------------------------------------------------
def write_cell(folder: Path, agents: int, workers: int, latencies_ms: list[float], update_ms: float,
               bound: float | None = None) -> Path:
    """A recording of a learner whose iterations after the first take `latencies_ms`, each holding
    `update_ms` of update (half of it communication) and the rest sampling."""
    path = folder / f"tom2c-a{agents}-w{workers}.arrow"
    extra = {"latency_bound_ms": bound} if bound is not None else {}
    info = RunInfo("tom2c", "simple_spread", agents, workers, 0, len(latencies_ms) + 1,
                   procs={"0": "learner"}, extra=extra)
    rows = [{"kind": "iter", "proc": 0, "t_ns": 100 * MS, "iter": 1}]  # start-up ends at 100 ms
    t = 100 * MS
    for k, lat in enumerate(latencies_ms, 1):
        dur, upd = int(lat * MS), int(update_ms * MS)
        rows += [
            {"kind": "span", "proc": 0, "name": "sample", "t_ns": t, "dur_ns": dur - upd, "iter": k},
            {"kind": "span", "proc": 0, "name": "update", "t_ns": t + dur - upd, "dur_ns": upd, "iter": k},
            {"kind": "span", "proc": 0, "name": "update/comm/graph", "parent": "update", "t_ns": t + dur - upd,
             "dur_ns": upd // 2, "iter": k},
            {"kind": "span", "proc": 0, "name": "update/backward", "parent": "update", "t_ns": t + dur - upd // 2,
             "dur_ns": upd // 4, "iter": k},
        ]
        t += dur
        rows.append({"kind": "iter", "proc": 0, "t_ns": t, "iter": k + 1})
    with RecordingWriter(path, info) as w:
        w.append(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
    return path


# Per agent count: update ms grows 8x per doubling; latencies per worker count. At 4 agents the
# 2-worker setting is fastest on average but 3 of its 100 iterations take 900 ms (p99 900).
CELLS = {
    (2, 1): ([100.0] * 100, 1.0), (2, 2): ([50.0] * 100, 1.0),
    (4, 1): ([120.0] * 100, 8.0), (4, 2): ([40.0] * 97 + [900.0] * 3, 8.0),
}


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    for (a, w), (lat, upd) in CELLS.items():
        write_cell(tmp_path, a, w, lat, upd, bound=500.0)
    return tmp_path


def test_sweep_table_of_hand_made_recordings_has_the_known_figures(sweep_dir: Path) -> None:
    rows = {(r.agents, r.workers): r for r in table(sorted(sweep_dir.glob("*.arrow")))}
    assert rows[2, 1].ips == pytest.approx(10.0) and rows[2, 2].ips == pytest.approx(20.0)
    assert rows[4, 2].ips == pytest.approx(100 / (97 * 0.040 + 3 * 0.900))  # 15.2, beats 8.3
    assert rows[4, 2].p99_ms == pytest.approx(900.0) and rows[4, 1].p99_ms == pytest.approx(120.0)
    assert rows[4, 1].update_growth_per_doubling == pytest.approx(8.0)
    assert rows[4, 1].comm_share_update == pytest.approx(0.5)
    assert rows[4, 1].phase_ms["update/comm/graph"] == pytest.approx(4.0)
    choices = bound_choices(list(rows.values()), 500.0)
    assert [(c.agents, dict(c.best.setting)["workers"]) for c in choices] == [(2, 2), (4, 1)]
    assert bound_lines(choices)[1] == ("tom2c, 4 agents, p99 within 500 ms: workers 1, 8.33 IPS (p99 120 ms); "
                                       "workers 2 over the bound (p99 900 ms)")
    assert bound_lines(choices)[0].endswith("workers 2, 20.00 IPS (p99 50 ms); workers 1 10.00 IPS (2.00x slower)")
    # Without the spikes' bound, the 2-worker setting wins at 4 agents too.
    assert dict(bound_choices(list(rows.values()), 1000.0)[1].best.setting) == {"workers": 2}


def _figures(html: str) -> dict[str, str]:
    return dict(re.findall(r"<figure id='(plot-[a-z]+)'>(.*?)</figure>", html, flags=re.S))


def test_report_command_holds_every_plot_and_the_choice(sweep_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    proc = marlwatch("report", str(sweep_dir), timeout=120)  # the bound comes from the recordings
    assert proc.returncode == 0, proc.stderr
    assert "tom2c, 4 agents, p99 within 500 ms: workers 1, 8.33 IPS" in proc.stdout  # the terminal version
    assert "\x1b" not in proc.stdout  # not a terminal: no colour codes
    html = (sweep_dir / "report.html").read_text()
    figs = _figures(html)
    assert set(figs) == {"plot-time", "plot-phases", "plot-shares", "plot-ips"}
    for svg in figs.values():  # each a real inline SVG drawing with its data, not an empty frame
        assert svg.lstrip().startswith("<svg") and svg.rstrip().endswith("</svg>") and svg.count("<path") > 5
    assert "update, 1w (8.00x/2x)" in figs["plot-time"] and "comm, 2w (8.00x/2x)" in figs["plot-time"]
    assert "comm/graph (8.00x/2x)" in figs["plot-phases"]
    assert "LBT 4a" in figs["plot-ips"] and "p99 &lt;= 500 ms" in figs["plot-ips"]
    # The table against the published figures, and nothing fetched from elsewhere.
    assert "about 8x" in html and "fitted 8.00x" in html and "47.0%" in html and "50.0%" in html
    assert not re.search(r"<script|<link|<img|src=|href=\"(?!#)", html)  # self-contained: nothing loaded from elsewhere
    # A bound given on the command line wins over the recorded one.
    proc = marlwatch("report", str(sweep_dir), "--latency-bound", "1000", "-o", str(sweep_dir / "r2.html"),
                     timeout=120)
    assert proc.returncode == 0 and "4 agents, p99 within 1000 ms: workers 2" in proc.stdout


def test_report_bad_input_is_one_line(tmp_path: Path) -> None:
    proc = marlwatch("report", str(tmp_path / "nope"), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"marlwatch: {tmp_path / 'nope'}: not a folder (give the folder a sweep wrote)"
    proc = marlwatch("report", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "no recordings" in proc.stderr and "Traceback" not in proc.stderr


def test_without_matplotlib_the_report_is_refused_before_anything_runs(tmp_path: Path, sweep_dir: Path) -> None:
    """The plotting library is an optional extra: without it `sweep --report` says how to get it
    before any cell runs, and `report` refuses with one line; the terminal plots need no extra."""
    import os

    hidden = tmp_path / "no-matplotlib"
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), os.environ.get("PYTHONPATH", "")])}
    proc = marlwatch("report", str(sweep_dir), env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "marlwatch: the HTML report needs matplotlib: pip install 'marlwatch[report]'"
    out = tmp_path / "sweep"
    proc = marlwatch("sweep", "--algo", "neurcomm", "--agents", "2", "--iterations", "1", "--report",
                     "--out", str(out), env=env, timeout=60)
    assert proc.returncode == 2 and "needs matplotlib" in proc.stderr and not out.exists()
